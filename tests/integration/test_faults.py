"""Faults with real processes on loopback (issue 10, "Hardening"): one test per fault, each on its own
sim-engine stack (`--engine sim`: workers start in seconds; a request's tokens are a pure function of its
seed, so a disturbed stream must equal an undisturbed run of the same request, token for token).

    prefill worker kill -9    requests re-routed to the other prefill worker; the dead one leaves routing
    kvstore kill -9           prefix misses, recompute, no client error; a new kvstore serves hits again
    Redis down                routing goes on from memory; the registry is written again once Redis is back
    scheduler kill -9         streams in flight finish untouched; a restarted scheduler routes again
    gateway kill -9           clients get a clean error, the workers drop the requests, a restart serves
    Prometheus down           (test_faults_prometheus.py) the built-in scraper stands in

A decode worker's kill -9 / SIGTERM mid-stream is test_resume.py (the real model, greedy output
identical to an undisturbed reference). docs/reliability.md#faults sums them up.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import openai
import pytest
import redis

from services.gen.ferry.v1 import common_pb2
from services.scheduler.persistence import HASH_KEY, decode
from services.worker.token_pusher import SINK_LOST_AFTER_S
from tests.integration.stack import MODEL, Shape, Stack, client, start_stack
from tests.procs import eventually, free_port, start, wait_for_port

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.soak]

SEED = 7
LONG_PROMPT = "the lighthouse keeper watched the storm roll in over the grey sea " * 12    # ~ 10 blocks


# ---- the stack and its processes --------------------------------------------------------------------
def sim_stack(name: str, folder: Path, model: Path, **shape) -> Stack:
    folder.mkdir()
    return start_stack(name, folder, model, shape=Shape(engine="sim", metrics=True, **shape))


def flag(proc: subprocess.Popen, name: str) -> str:
    args = [str(a) for a in proc.args]
    return args[args.index(name) + 1]


def kill_9(stack: Stack, name: str) -> None:
    proc = stack.procs[name]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def wait_listening(proc: subprocess.Popen, port_flags: tuple[str, ...]) -> None:
    """Wait until `proc` listens on every port it was given (its gRPC or HTTP port and its /metrics)."""
    args = [str(a) for a in proc.args]
    for option in port_flags + ("--metrics-port",):
        if option in args:
            wait_for_port(int(flag(proc, option)), proc, timeout=60)


def restart(stack: Stack, name: str, port_flag: str = "--port") -> subprocess.Popen:
    """Start `name` again with the arguments it had (same ports), once the old process is gone and the new
    one listens on all of them."""
    old = stack.procs[name]
    assert old.poll() is not None, f"{name} still runs"
    stack.procs[name] = start([str(a) for a in old.args[3:]], log=stack.log(name))   # after `python -m services.cli`
    wait_listening(stack.procs[name], (port_flag,))
    return stack.procs[name]


def clone(stack: Stack, name: str, new_name: str, ports: dict[str, int]) -> subprocess.Popen:
    """Start another process like `name`, with some ports changed (flag -> port)."""
    args = [str(a) for a in stack.procs[name].args[3:]]
    for option, port in ports.items():
        args[args.index(option) + 1] = str(port)
    stack.procs[new_name] = start(args, log=stack.log(new_name))
    wait_listening(stack.procs[new_name], ("--port",))
    return stack.procs[new_name]


def healthy(stack: Stack, role: int) -> set[str]:
    return {s.instance.address for s in stack.instances() if s.healthy and s.instance.role == role}


def metric(stack: Stack, process: str, name: str) -> float:
    """Sum of a metric's samples on one process's /metrics (0 when absent)."""
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_ports[process]}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and line[len(name):len(name) + 1] in (" ", "{"))


def busy(stack: Stack) -> int:
    """Requests running or waiting on every worker the scheduler lists that still answers."""
    total = 0
    for stats in stack.worker_stats():
        total += stats.load.num_running + stats.load.num_waiting
    return total


# ---- requests -----------------------------------------------------------------------------------------
def generate(stack: Stack, prompt: str, max_tokens: int) -> str:
    """One completion, not streamed; raises on any error."""
    r = client(stack).completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, seed=SEED,
                                         extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == max_tokens, r
    return r.choices[0].text


class Streamer(threading.Thread):
    """One streamed completion; `midway` is set after `num_midway` chunks (or at the end)."""

    def __init__(self, stack: Stack, prompt: str, max_tokens: int, num_midway: int = 8) -> None:
        super().__init__(daemon=True)
        self.stack, self.prompt, self.max_tokens, self.num_midway = stack, prompt, max_tokens, num_midway
        self.parts: list[str] = []
        self.finish: str | None = None
        self.num_tokens = 0
        self.error: Exception | None = None
        self.midway = threading.Event()
        self.start()

    def run(self) -> None:
        try:
            for chunk in client(self.stack).completions.create(
                    model=MODEL, prompt=self.prompt, max_tokens=self.max_tokens, seed=SEED, stream=True,
                    stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
                if chunk.usage is not None:
                    self.num_tokens = chunk.usage.completion_tokens
                    continue
                self.parts.append(chunk.choices[0].text)
                self.finish = chunk.choices[0].finish_reason or self.finish
                if len(self.parts) >= self.num_midway:
                    self.midway.set()
        except Exception as e:  # noqa: BLE001 (the test looks at it)
            self.error = e
        self.midway.set()

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def check(self, want: str) -> None:
        """Finished, every token once: the text of an undisturbed run of the same request."""
        assert self.error is None, self.error
        assert self.finish == "length" and self.num_tokens == self.max_tokens
        assert self.text == want, "a token lost, repeated or changed"


def succeeds(call: Callable[[], object]) -> bool:
    try:
        call()
    except openai.APIStatusError as e:          # 503 while a service comes back: clean, retried
        assert e.status_code == 503, e
        return False
    return True


def undisturbed(stack: Stack, prompts: list[str], max_tokens: int) -> dict[str, str]:
    """Each prompt's text from a stream nothing disturbs (the reference of a disturbed one)."""
    streams = [Streamer(stack, p, max_tokens) for p in prompts]
    for s in streams:
        s.join(180)
        assert s.error is None and s.num_tokens == max_tokens, s.error
    return {s.prompt: s.text for s in streams}


class Traffic:
    """Closed-loop requests from `num` threads until stopped; every outcome recorded."""

    def __init__(self, stack: Stack, num: int, max_tokens: int, prompt: Callable[[int], str]) -> None:
        self.stack, self.max_tokens, self.prompt = stack, max_tokens, prompt
        self.results: list[tuple[float, float, str]] = []       # (sent, done, error or "")
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(num)]
        for t in self.threads:
            t.start()

    def _loop(self, i: int) -> None:
        n = 0
        while not self.stopping.is_set():
            sent, error = time.monotonic(), ""
            try:
                generate(self.stack, self.prompt(i * 1000 + n), self.max_tokens)
            except Exception as e:  # noqa: BLE001 (counted; the test fails on it)
                error = f"{type(e).__name__}: {e}"
            with self.lock:
                self.results.append((sent, time.monotonic(), error))
            n += 1

    def num_done(self) -> int:
        with self.lock:
            return len(self.results)

    def stop(self, timeout: float = 60) -> list[tuple[float, float, str]]:
        self.stopping.set()
        for t in self.threads:
            t.join(timeout)
        assert not any(t.is_alive() for t in self.threads), "a request hangs"
        return self.results


# ---- the faults -----------------------------------------------------------------------------------------
def test_scheduler_kill_9_mid_stream_then_restart_streams_finish_untouched(tmp_path, smollm2_path):
    """Tokens flow worker -> gateway, not through the scheduler: streams in flight finish as if nothing
    happened. The restarted scheduler (same port, same Redis) restores the registry and routes again."""
    stack = sim_stack("scheduler-restart", tmp_path / "stack", smollm2_path, num_decode=2)
    try:
        prompts = [f"Story {i}. {LONG_PROMPT}" for i in range(3)]
        want = undisturbed(stack, prompts, 800)
        streams = [Streamer(stack, p, 800) for p in prompts]
        assert all(s.midway.wait(60) for s in streams)
        kill_9(stack, "scheduler")
        in_flight = sum(s.is_alive() for s in streams)
        started = time.monotonic()
        restart(stack, "scheduler")
        print(f"scheduler back after {time.monotonic() - started:.1f} s; {in_flight} streams were in flight")
        for s in streams:
            s.join(180)
            s.check(want[s.prompt])
        assert in_flight == len(streams), "the streams were in flight when the scheduler died"
        assert "restored 3 instance(s)" in stack.log("scheduler").read_text(), "the registry came from Redis"
        assert eventually(lambda: len(healthy(stack, common_pb2.ROLE_DECODE)) == 2
                          and len(healthy(stack, common_pb2.ROLE_PREFILL)) == 1, timeout=30, interval=0.2)
        # The gateway's channel to the scheduler reconnects on gRPC's backoff (seconds after an outage
        # this short): until then a request gets a clean 503, never a hang.
        back = time.monotonic()
        assert eventually(lambda: succeeds(lambda: generate(stack, "A new request after the restart.", 16)),
                          timeout=60, interval=0.5)
        print(f"the gateway routes again {time.monotonic() - back:.1f} s after the workers are healthy")
        assert metric(stack, "scheduler", "ferry_scheduler_route_decisions_total") >= 1, "routed by the new one"
    finally:
        stack.stop()


def test_gateway_kill_9_mid_stream_clean_client_error_and_nothing_stuck_on_workers(tmp_path, smollm2_path):
    """The clients' connections close (an error, not a hang); the workers, whose TokenSink is gone,
    drop the requests within a bounded time (they would otherwise run for minutes); a gateway started
    again on the same ports serves new requests."""
    stack = sim_stack("gateway-restart", tmp_path / "stack", smollm2_path, num_decode=2)
    try:
        streams = [Streamer(stack, f"Story {i}. {LONG_PROMPT}", 6000) for i in range(3)]
        assert all(s.midway.wait(60) for s in streams)
        assert busy(stack) >= 3
        killed = time.monotonic()
        kill_9(stack, "gateway")
        for s in streams:
            s.join(30)
            assert not s.is_alive(), "the client hangs"
            assert s.error is not None and s.finish is None, "the client sees the stream break"
        # Left alone they would run ~60 s more; the workers give up on the sink after SINK_LOST_AFTER_S.
        assert eventually(lambda: busy(stack) == 0, timeout=SINK_LOST_AFTER_S + 20, interval=0.5), \
            "requests stuck on the workers"
        print(f"workers idle {time.monotonic() - killed:.1f} s after the kill")
        restart(stack, "gateway")
        assert eventually(lambda: stack.metric("ferry_gateway_requests_total") >= 0, timeout=30)
        generate(stack, "A new request after the restart.", 16)
        stream = Streamer(stack, "Another one, streamed.", 32)
        stream.join(60)
        assert stream.error is None and stream.finish == "length" and stream.num_tokens == 32
    finally:
        stack.stop()


def test_gateway_restarted_at_once_stops_the_requests_of_its_former_self(tmp_path, smollm2_path):
    """A gateway back within SINK_LOST_AFTER_S: the workers reconnect before they give up on it, and the
    tokens of its former requests reach the new gateway, which has no client for them: it tells the
    workers to stop them, so they do not run on to max_tokens."""
    stack = sim_stack("gateway-quick-restart", tmp_path / "stack", smollm2_path, num_decode=2)
    try:
        streams = [Streamer(stack, f"Tale {i}. {LONG_PROMPT}", 6000) for i in range(3)]
        assert all(s.midway.wait(60) for s in streams)
        assert busy(stack) >= 3
        kill_9(stack, "gateway")
        restart(stack, "gateway")
        restarted = time.monotonic()
        for s in streams:
            s.join(30)
            assert s.error is not None and s.finish is None, "the client sees the stream break"
        assert eventually(lambda: busy(stack) == 0, timeout=SINK_LOST_AFTER_S, interval=0.2), \
            "the former gateway's requests run on"
        print(f"workers idle {time.monotonic() - restarted:.1f} s after the restart")
        generate(stack, "A new request after the restart.", 16)
    finally:
        stack.stop()


def test_prefill_worker_kill_9_mid_traffic_requests_go_to_the_other(tmp_path, smollm2_path):
    """Two prefill workers under closed-loop traffic; one dies. Requests in its prefill resume on the
    other one (the gateway's resume path); later ones are routed there; no client sees an error, and
    the dead one leaves routing after the heartbeat timeout."""
    stack = sim_stack("prefill-death", tmp_path / "stack", smollm2_path)
    try:
        clone(stack, "prefill", "prefill-1", {"--port": free_port(), "--metrics-port": free_port()})
        assert eventually(lambda: len(healthy(stack, common_pb2.ROLE_PREFILL)) == 2, timeout=60, interval=0.2)
        traffic = Traffic(stack, 4, 24, lambda n: f"Request {n}. {LONG_PROMPT}")
        assert eventually(lambda: traffic.num_done() >= 8, timeout=60, interval=0.2)
        victim = f"127.0.0.1:{flag(stack.procs['prefill'], '--port')}"
        kill_9(stack, "prefill")
        num_before = traffic.num_done()
        # one failure in ~12 runs was seen (2026-12-02, cause not captured): every step reports the logs
        assert eventually(lambda: victim not in healthy(stack, common_pb2.ROLE_PREFILL), timeout=30,
                          interval=0.2), stack.tails(60)
        assert eventually(lambda: traffic.num_done() >= num_before + 16, timeout=120, interval=0.2), \
            stack.tails(60)
        results = traffic.stop()
        assert [r for r in results if r[2]] == [], f"a request failed\n{stack.tails(60)}"
        assert len(healthy(stack, common_pb2.ROLE_PREFILL)) == 1, stack.tails(60)
    finally:
        stack.stop()


def test_kvstore_kill_9_prefix_misses_recompute_then_hits_when_it_returns(tmp_path, smollm2_path):
    """Prefix blocks that one prefill worker stores serve the other (round-robin routing, so the same
    prompt lands on both). With the kvstore dead every request still completes (the prefix is computed);
    a kvstore started again on the same port is written and read again: its hits come back."""
    stack = sim_stack("kvstore-death", tmp_path / "stack", smollm2_path,
                      scheduler_args=("--routing-config", "round_robin"))
    try:
        clone(stack, "prefill", "prefill-1", {"--port": free_port(), "--metrics-port": free_port()})
        assert eventually(lambda: len(healthy(stack, common_pb2.ROLE_PREFILL)) == 2, timeout=60, interval=0.2)

        def store_hits() -> float:
            return metric(stack, "kvstore", "ferry_kvstore_hits_total")

        def hits_with(prompt: str) -> bool:
            """Send `prompt` twice more (one lands on each prefill worker); did the kvstore serve it?"""
            before = store_hits()
            generate(stack, prompt, 8)
            generate(stack, prompt, 8)
            return store_hits() > before

        assert eventually(lambda: hits_with(f"First. {LONG_PROMPT}"), timeout=60, interval=0.2), \
            "the kvstore serves one worker's prefix to the other"
        kill_9(stack, "kvstore")
        for i in range(6):                              # misses, recompute, no error
            generate(stack, f"Without the store {i}. {LONG_PROMPT}", 8)
            generate(stack, f"Without the store {i}. {LONG_PROMPT}", 8)
        restart(stack, "kvstore")
        assert store_hits() == 0, "a new, empty kvstore"
        n = iter(range(1000))
        assert eventually(lambda: hits_with(f"Back {next(n)}. {LONG_PROMPT}"), timeout=90, interval=0.5), \
            "prefix hits come back with the kvstore"
        cached = stack.metric("ferry_gateway_prompt_cached_tokens_total")
        assert cached > 0
        assert "kvstore unavailable" in stack.log("prefill").read_text() + stack.log("prefill-1").read_text()
    finally:
        stack.stop()


def test_redis_down_routing_goes_on_from_memory_and_the_registry_is_written_again(tmp_path, smollm2_path):
    """Redis is the registry's copy, not its truth: with Redis gone the scheduler keeps routing from
    memory and the workers stay registered; a Redis started again (empty) gets every instance back."""
    stack = sim_stack("redis-down", tmp_path / "stack", smollm2_path)
    try:
        redis_port = int(flag(stack.procs["scheduler"], "--redis-url").rsplit(":", 1)[1].split("/")[0])
        store = redis.Redis(host="127.0.0.1", port=redis_port, socket_timeout=5)

        def stored() -> set[str]:
            try:
                return {k.decode() for k in store.hkeys(HASH_KEY)}
            except redis.RedisError:
                return set()

        ids = {s.instance.instance_id for s in stack.instances()}
        assert len(ids) == 2 and eventually(lambda: stored() == ids, timeout=30, interval=0.2)
        old = stack.procs["redis"]
        kill_9(stack, "redis")
        for i in range(6):
            generate(stack, f"Redis is down {i}.", 16)
        time.sleep(2 * 0.2 + 3)         # well past the heartbeat timeout: nobody was dropped for Redis
        assert {s.instance.instance_id for s in stack.instances() if s.healthy} == ids
        log = open(stack.log("redis"), "ab")  # noqa: SIM115 (the child owns it)
        stack.procs["redis"] = subprocess.Popen(old.args, cwd=stack.folder, stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True)
        log.close()
        wait_for_port(redis_port, stack.procs["redis"], timeout=30)
        assert eventually(lambda: stored() == ids, timeout=30, interval=0.2), "the scheduler writes Redis again"
        now = time.time()
        entries = [decode(raw) for raw in store.hvals(HASH_KEY)]
        assert all(now - e.last_heartbeat < 10 for e in entries), "fresh heartbeats, not stale copies"
        generate(stack, "Redis is back.", 16)
        assert "will retry" in stack.log("scheduler").read_text()
    finally:
        stack.stop()
