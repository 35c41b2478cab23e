"""Modelled GPU power for workers without a power sensor (`--engine sim`): a linear model of busy time.

    power  = idle_watts + (peak_watts - idle_watts) * busy fraction of the last WINDOW_S of wall time
    energy = idle_watts * wall seconds + (peak_watts - idle_watts) * busy seconds   (since the start)

"Busy" is wall time inside engine steps (`BusyTime`, fed by the EngineLoop); a sim engine paced in real
time sleeps through each step's modelled duration, so that is the time the modelled GPU would compute.
The defaults (100 W idle, 700 W peak) are an H100 SXM's. The energy counter is exact whatever the scrape
interval; the power gauge is a moving average over the window (use rate(energy) for other windows).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

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
