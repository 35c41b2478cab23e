"""`EngineLoop`: one engine on its own thread, driven from asyncio.

The engine is not thread-safe and its steps block (tens of ms), so every engine call happens on one
thread, between steps:

    asyncio handlers --call(fn)--> command queue --> [engine thread]  run commands
                                                                     step()  (if there is work)
                                                                     after_step(outputs)   (engine thread)
    asyncio  <--call_soon_threadsafe(on_outputs)--------------------------------------------'

`after_step` runs on the engine thread right after a step, before the next one is scheduled: the
prefill role exports KV there. `on_outputs` runs on the event loop with whatever `after_step` returned.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import sys
import threading
from collections.abc import Callable
from typing import Any

from services.engine.engine import BaseEngine, RequestOutput
from services.worker.power import BusyTime

log = logging.getLogger(__name__)

SWITCH_INTERVAL_S = 0.0005
AfterStep = Callable[[BaseEngine, list[RequestOutput]], Any]


class EngineLoop:
    def __init__(self, engine: BaseEngine, loop: asyncio.AbstractEventLoop,
                 after_step: AfterStep, on_outputs: Callable[[Any], None],
                 on_failure: Callable[[Exception], None]) -> None:
        self.engine = engine
        self._loop = loop
        self._after_step = after_step
        self._on_outputs = on_outputs
        self._on_failure = on_failure
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._stopped = False
        self.stats: dict[str, int] = {}          # refreshed after every step and command batch (read anywhere)
        self.requests: list[tuple] = []          # engine.request_loads(), refreshed alike
        self._snapshot()
        self.num_steps = 0
        self.busy = BusyTime()                   # wall time inside steps (the power model's input)
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self) -> None:
        # The engine thread holds the GIL through the Python parts of a step; the event loop (gRPC
        # replies, token pushes) waits for it up to the switch interval each time it needs it. The
        # default 5 ms made each hand-over (an Admit, a PushKV ack) cost several ms while a step ran.
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        """The engine thread runs (False before start() and after it died or stopped)."""
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stopped = True
        self._commands.put(None)
        self._thread.join(timeout=10)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(engine, *args)` on the engine thread between steps; its result or exception."""
        future = self._loop.create_future()
        self._commands.put((fn, args, future))
        return await future

    def _run(self) -> None:
        while not self._stopped:
            self._run_commands(block=not self.engine.has_unfinished)
            if self._stopped or not self.engine.has_unfinished:
                continue
            try:
                with self.busy.busy():
                    outputs = self.engine.step()
                result = self._after_step(self.engine, outputs)
            except Exception as e:  # a failed step must not kill the worker silently
                log.exception("engine step failed")
                self._loop.call_soon_threadsafe(self._on_failure, e)
                continue
            self.num_steps += 1
            self._snapshot()
            self._loop.call_soon_threadsafe(self._on_outputs, result)

    def _run_commands(self, block: bool) -> None:
        try:
            item = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            fn, args, future = item
            try:
                result, error = fn(self.engine, *args), None
            except Exception as e:  # noqa: BLE001 (the caller gets it re-raised)
                result, error = None, e
            self._loop.call_soon_threadsafe(_settle, future, result, error)
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                break
        self._snapshot()

    def _snapshot(self) -> None:
        self.stats = dict(self.engine.stats)
        self.requests = self.engine.request_loads()


def _settle(future: asyncio.Future, result: Any, error: Exception | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
