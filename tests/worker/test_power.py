"""The GPU power models of sim workers (services/worker/power.py), on a hand-driven clock: the linear
model of busy time and the simulated GPU with a clock (caps)."""
from __future__ import annotations

import pytest

from services.common.gpu_power import H100_SXM
from services.worker.power import BusyTime, LinearPowerModel, SimulatedGpu, simulated_gpu


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def step(busy: BusyTime, clock: Clock, seconds: float) -> None:
    with busy.busy():
        clock.now += seconds


def test_idle_gpu_draws_idle_watts_and_integrates_them():
    clock = Clock()
    model = LinearPowerModel(BusyTime(10.0, clock), idle_watts=100, peak_watts=700)
    clock.now += 20
    assert model.read() == (100, 2000)


def test_busy_fraction_of_the_window_sets_the_power():
    clock = Clock()
    busy = BusyTime(10.0, clock)
    model = LinearPowerModel(busy, idle_watts=100, peak_watts=700)
    clock.now += 10
    step(busy, clock, 5)            # [10, 15)
    clock.now += 5                  # window [10, 20): half busy
    power, energy = model.read()
    assert power == pytest.approx(100 + 600 * 0.5)
    assert energy == pytest.approx(100 * 20 + 600 * 5)
    clock.now += 12                 # the busy block left the window; the energy keeps it
    power, energy = model.read()
    assert power == pytest.approx(100)
    assert energy == pytest.approx(100 * 32 + 600 * 5)


def test_a_step_in_progress_counts_up_to_now():
    clock = Clock()
    busy = BusyTime(10.0, clock)
    model = LinearPowerModel(busy, idle_watts=100, peak_watts=700)
    clock.now += 10
    with busy.busy():
        clock.now += 10
        assert model.read() == (pytest.approx(700), pytest.approx(100 * 20 + 600 * 10))


def test_a_block_straddling_the_window_start_counts_its_part_inside():
    clock = Clock()
    busy = BusyTime(10.0, clock)
    clock.now += 5
    step(busy, clock, 10)           # [5, 15); window at 20 is [10, 20): 5 s busy
    clock.now += 5
    assert busy.snapshot()[2] == pytest.approx(0.5)


def test_peak_below_idle_is_refused():
    with pytest.raises(ValueError, match="idle watts"):
        LinearPowerModel(BusyTime(), idle_watts=300, peak_watts=200)


# ---- SimulatedGpu: the clock-aware model behind --engine sim ------------------------------------------

def simulated(clock: Clock, on_clock=None) -> tuple[BusyTime, SimulatedGpu]:
    busy = BusyTime(10.0, clock)
    return busy, simulated_gpu(busy, H100_SXM, idle_watts=100, peak_watts=700, on_clock=on_clock)


def test_uncapped_simulated_gpu_is_the_linear_model():
    clock = Clock()
    busy, gpu = simulated(clock)
    linear = LinearPowerModel(busy, idle_watts=100, peak_watts=700)
    clock.now += 10
    step(busy, clock, 5)
    clock.now += 5
    reading = gpu.read()
    assert (reading.power_watts, reading.energy_joules) == pytest.approx(linear.read())
    assert reading.clock_mhz == H100_SXM.max_clock_mhz and reading.clock_cap_mhz is None
    assert reading.power_limit_watts == 700


def test_a_clock_cap_lowers_power_slows_the_engine_and_energy_integrates_piecewise():
    clock, ratios = Clock(), []
    busy, gpu = simulated(clock, ratios.append)
    step(busy, clock, 10)                               # 10 s busy at the full clock
    gpu.apply(990, None)
    assert ratios == [pytest.approx(990 / 1980)]
    step(busy, clock, 10)                               # 10 s busy at half the clock
    reading = gpu.read()
    scale = H100_SXM.clock_scale(990)
    assert reading.clock_cap_mhz == 990 and reading.clock_mhz == 990
    assert reading.power_watts == pytest.approx(100 + 600 * scale)            # the window: all capped
    assert reading.energy_joules == pytest.approx(100 * 20 + 600 * 10 + 600 * 10 * scale)
    gpu.apply(None, None)
    assert ratios[-1] == 1.0 and gpu.read().clock_cap_mhz is None


def test_a_power_limit_picks_the_highest_clock_whose_full_load_fits():
    clock = Clock()
    _, gpu = simulated(clock)
    gpu.apply(None, 400)
    reading = gpu.read()
    assert reading.power_limit_watts == 400
    assert gpu.spec.power_watts(1.0, reading.clock_mhz) <= 400
    assert gpu.spec.power_watts(1.0, reading.clock_mhz + gpu.spec.clock_step_mhz) > 400
    gpu.apply(None, 10)                                 # below what one may set: the minimum limit
    assert gpu.read().power_limit_watts == gpu.spec.min_power_limit_watts


def test_caps_below_the_supported_clocks_are_clamped_and_nonsense_refused():
    _, gpu = simulated(Clock())
    gpu.apply(100, None)
    assert gpu.read().clock_mhz == H100_SXM.min_clock_mhz
    with pytest.raises(ValueError):
        gpu.apply(-5, None)
