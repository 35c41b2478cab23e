"""GPU power backends of a worker: what `/metrics` exports and what `Worker.SetPowerCap` changes.

    GpuBackend (one small interface)
      read()  -> GpuReading: power W, energy J since the worker started, power limit W, SM clock MHz,
                 the clock cap in force
      apply(clock_mhz, watts) -> what it set: lock the SM clock at most `clock_mhz`, or set a power limit
                 (None, None: remove the cap). Raises PermissionError where the worker may not.
    SimulatedGpu   (`--engine sim`, the local runtime, tests) the power model of common/gpu_power.py on the
                   engine loop's busy time; a clock cap also slows the sim engine's steps (its clock_ratio)
    NvmlGpu        (nvml_gpu.py; CUDA workers) reads NVML; changes settings only with --power-control

The simulated GPU's model, with u the busy fraction of the last WINDOW_S of wall time and f its clock:

    power  = idle + (peak - idle) * u * clock_scale(f)       clock_scale(f_max) = 1 (gpu_power.py)
    energy = idle * wall seconds + (peak - idle) * sum over busy seconds of clock_scale(f at that time)

"Busy" is wall time inside engine steps (`BusyTime`, fed by the EngineLoop); a sim engine paced in real
time sleeps through each step's modelled duration, so that is the time the modelled GPU would compute.
The defaults (100 W idle, 700 W peak, `--gpu-idle-watts`, `--gpu-peak-watts`) are an H100 SXM's. The
energy counter is exact whatever the scrape interval; the power gauge is a moving average over the window
(use rate(energy) for other windows). `LinearPowerModel` is the same model without a clock.
"""
from __future__ import annotations

import enum
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Protocol

from services.common.gpu_power import GpuSpec

WINDOW_S = 15.0         # the default scrape interval of the chart's monitors


class BusyTime:
    """Wall time spent inside `busy()` blocks: the running total and the recent intervals."""

    def __init__(self, window_s: float = WINDOW_S, clock=time.monotonic) -> None:
        self.window_s = window_s
        self.clock = clock
        self.started = clock()
        self.total_s = 0.0
        self._current: float | None = None                     # start of the block running now
        self._recent: deque[tuple[float, float]] = deque()     # (start, end) of blocks in the window
        self._lock = threading.Lock()

    @contextmanager
    def busy(self) -> Iterator[None]:
        start = self.clock()
        self._current = start
        try:
            yield
        finally:
            end = self.clock()
            with self._lock:
                self._current = None
                self.total_s += end - start
                self._recent.append((start, end))
                while self._recent and self._recent[0][1] < end - self.window_s:
                    self._recent.popleft()

    def snapshot(self) -> tuple[float, float, float]:
        """(wall seconds since the start, busy seconds since the start, busy fraction of the window)."""
        now = self.clock()
        with self._lock:
            current, total, recent = self._current, self.total_s, list(self._recent)
        since = max(self.started, now - self.window_s)
        intervals = recent + ([(current, now)] if current is not None else [])
        busy_in_window = sum(max(0.0, end - max(start, since)) for start, end in intervals)
        running = now - current if current is not None else 0.0
        window = now - since
        return now - self.started, total + running, min(1.0, busy_in_window / window) if window > 0 else 0.0


class LinearPowerModel:
    """Power and energy of one modelled GPU from a `BusyTime`."""

    def __init__(self, busy: BusyTime, idle_watts: float, peak_watts: float) -> None:
        if not 0 <= idle_watts <= peak_watts:
            raise ValueError(f"need 0 <= idle watts ({idle_watts}) <= peak watts ({peak_watts})")
        self.busy = busy
        self.idle_watts = idle_watts
        self.peak_watts = peak_watts

    def read(self) -> tuple[float, float]:
        """(power now in watts, energy since the start in joules)."""
        wall_s, busy_s, fraction = self.busy.snapshot()
        dynamic = self.peak_watts - self.idle_watts
        return self.idle_watts + dynamic * fraction, self.idle_watts * wall_s + dynamic * busy_s


class PowerControl(enum.Enum):
    """What a worker may change on its GPU (`--power-control`): nothing (the default), the SM clock, or the
    power limit. Real GPUs need root (or a privileged pod) for either; never on a shared machine."""
    OFF = "off"
    CLOCKS = "clocks"
    POWER_LIMIT = "power-limit"


@dataclass(frozen=True, slots=True)
class GpuReading:
    power_watts: float
    energy_joules: float                 # since the backend started
    power_limit_watts: float             # the limit the GPU enforces now
    clock_mhz: float                     # SM clock now
    max_clock_mhz: float
    clock_cap_mhz: float | None = None   # the locked maximum SM clock in force (None: not locked)


class GpuBackend(Protocol):
    name: str
    control: PowerControl

    def read(self) -> GpuReading: ...

    def apply(self, clock_mhz: float | None, watts: float | None) -> str:
        """Cap the GPU (None, None: uncap); returns what was set, in words."""
        ...

    def close(self) -> None: ...


class SimulatedGpu:
    """A modelled GPU (common/gpu_power.py) on a `BusyTime`; `on_clock(f / f_max)` is called when its
    clock changes (the sim engine slows its steps by it). Caps always apply: nothing real is touched."""
    name = "simulated"

    def __init__(self, busy: BusyTime, spec: GpuSpec, on_clock: Callable[[float], None] | None = None) -> None:
        self.busy = busy
        self.spec = spec
        self.control = PowerControl.CLOCKS
        self.on_clock = on_clock
        self.clock_cap_mhz: float | None = None
        self.power_limit_watts = spec.peak_watts
        self._lock = threading.Lock()
        self._dynamic_joules = 0.0       # dynamic energy of busy time before the last clock change
        self._busy_mark_s = 0.0          # busy seconds at the last clock change

    @property
    def clock_mhz(self) -> float:
        """The clock it runs at: the cap, or the highest clock whose full-load power fits the limit."""
        limit_clock = next((c for c in self.spec.clocks() if self.spec.power_watts(1.0, c) <= self.power_limit_watts),
                           self.spec.min_clock_mhz)
        return min(self.clock_cap_mhz or self.spec.max_clock_mhz, limit_clock)

    def read(self) -> GpuReading:
        wall_s, busy_s, fraction = self.busy.snapshot()
        with self._lock:
            clock = self.clock_mhz
            dynamic = self._dynamic_joules + (busy_s - self._busy_mark_s) * self.spec.dynamic_watts \
                * self.spec.clock_scale(clock)
            return GpuReading(power_watts=self.spec.power_watts(fraction, clock),
                              energy_joules=self.spec.idle_watts * wall_s + dynamic,
                              power_limit_watts=self.power_limit_watts, clock_mhz=clock,
                              max_clock_mhz=self.spec.max_clock_mhz, clock_cap_mhz=self.clock_cap_mhz)

    def apply(self, clock_mhz: float | None, watts: float | None) -> str:
        if clock_mhz is not None and clock_mhz <= 0 or watts is not None and watts <= 0:
            raise ValueError(f"a cap must be positive (clock {clock_mhz} MHz, {watts} W)")
        _, busy_s, _ = self.busy.snapshot()
        with self._lock:
            before = self.clock_mhz
            # Close the busy time so far at the old clock's power, then switch.
            self._dynamic_joules += (busy_s - self._busy_mark_s) * self.spec.dynamic_watts \
                * self.spec.clock_scale(before)
            self._busy_mark_s = busy_s
            self.clock_cap_mhz = None if clock_mhz is None else \
                min(max(clock_mhz, self.spec.min_clock_mhz), self.spec.max_clock_mhz)
            self.power_limit_watts = self.spec.peak_watts if watts is None else \
                min(max(watts, self.spec.min_power_limit_watts), self.spec.peak_watts)
            after = self.clock_mhz
        if self.on_clock is not None:
            self.on_clock(self.spec.clock_ratio(after))
        return f"simulated GPU at {after:.0f} MHz (cap {self.clock_cap_mhz or 'none'}, limit " \
               f"{self.power_limit_watts:.0f} W)"

    def close(self) -> None:
        pass


def simulated_gpu(busy: BusyTime, spec: GpuSpec, idle_watts: float, peak_watts: float,
                  on_clock: Callable[[float], None] | None = None) -> SimulatedGpu:
    """A SimulatedGpu of `spec` with the worker's --gpu-idle-watts / --gpu-peak-watts."""
    spec = replace(spec, idle_watts=idle_watts, peak_watts=peak_watts,
                   min_power_limit_watts=min(spec.min_power_limit_watts, peak_watts))
    return SimulatedGpu(busy, spec, on_clock)
