"""The linear GPU power model of sim workers (services/worker/power.py), on a hand-driven clock."""
from __future__ import annotations

import pytest

from services.worker.power import BusyTime, LinearPowerModel


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
