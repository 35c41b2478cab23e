"""Closed-loop streaming load through the gateway, for the autoscaling tests: each stream sends a streamed
completion, measures its TPOT against the SLO, and sends the next."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import openai

PROMPT = "hello " * 300


@dataclass
class Done:
    started: float
    finished: float
    tpot_s: float | None        # None: the request failed
    error: str = ""
    slo_tpot_s: float = 0.0

    @property
    def met(self) -> bool:
        return self.tpot_s is not None and self.tpot_s <= self.slo_tpot_s


@dataclass
class Load:
    """Closed-loop streams: each sends a streamed completion, measures its TPOT, and sends the next."""
    base_url: str
    model: str
    slo_tpot_s: float
    max_tokens: int = 100
    prompt: str = PROMPT
    done: list[Done] = field(default_factory=list)
    streams: list[threading.Event] = field(default_factory=list)     # the running streams' stop flags
    threads: list[threading.Thread] = field(default_factory=list)    # every stream ever started
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, n: int) -> None:
        for _ in range(n):
            stop = threading.Event()
            self.threads.append(threading.Thread(target=self._loop, args=(stop,), daemon=True))
            self.threads[-1].start()
            self.streams.append(stop)

    def remove(self, n: int) -> None:
        """Stop `n` streams after their current request (which runs on)."""
        for stop in self.streams[-n:]:
            stop.set()
        self.streams = self.streams[:-n]

    def join(self, timeout: float) -> None:
        for stop in self.streams:
            stop.set()
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _loop(self, stop: threading.Event) -> None:
        client = openai.OpenAI(base_url=self.base_url, api_key="x", timeout=120, max_retries=0)
        while not stop.is_set():
            started = time.monotonic()
            stamps: list[float] = []
            finish = None
            try:
                for chunk in client.completions.create(model=self.model, prompt=self.prompt, max_tokens=self.max_tokens,
                                                       stream=True, extra_body={"ignore_eos": True}):
                    if chunk.choices and chunk.choices[0].text:
                        stamps.append(time.monotonic())
                    if chunk.choices and chunk.choices[0].finish_reason:
                        finish = chunk.choices[0].finish_reason
                if len(stamps) < 2 or finish != "length":      # ignore_eos: every stream runs to max_tokens
                    raise RuntimeError(f"{len(stamps)} chunks streamed, finish_reason {finish!r}")
                record = Done(started, stamps[-1], (stamps[-1] - stamps[0]) / (len(stamps) - 1), "",
                              self.slo_tpot_s)
            except Exception as e:  # noqa: BLE001 (every failure is counted, and the test fails on it)
                record = Done(started, time.monotonic(), None, f"{type(e).__name__}: {e}", self.slo_tpot_s)
            with self.lock:
                self.done.append(record)

    def between(self, start: float, end: float) -> list[Done]:
        with self.lock:
            return [d for d in self.done if start <= d.started and d.finished <= end]


def attainment(done: list[Done]) -> float:
    return sum(d.met for d in done) / len(done)
