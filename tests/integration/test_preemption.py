"""A spot preemption notice with a 30 s deadline on a loaded decode worker: the scheduler's just-in-time
planner lets the requests that finish in time stay and live-migrates the others; every stream completes
with exactly the tokens of an uninterrupted greedy run, the worker is empty before the deadline, and
the cloud's kill at the deadline costs nothing.

On two shared CPU cores every request here would finish within 30 s, so the scheduler runs with a 24 s
safety margin: only what is predicted done 24 s before the deadline (the short streams) stays in
place, and the long ones take the migration path, as they would on a GPU with a long generation left.
"""
from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request

import grpc
import pytest
import torch

from services.engine.sampling import SamplingParams
from services.gen.ferry.v1 import scheduler_pb2, scheduler_pb2_grpc
from tests.integration.stack import MODEL, Shape, client, start_stack
from tests.procs import eventually

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPT = "Write a long story about a lighthouse keeper and the storm that changed everything."
SHORT, LONG = 32, 200
STREAMS = (LONG, SHORT, LONG, SHORT, LONG, SHORT)
DEADLINE_S = 30.0
SAFETY_MARGIN_S = 24.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory, smollm2_path):
    stack = start_stack("preempt", tmp_path_factory.mktemp("preempt"), smollm2_path,
                        shape=Shape(num_decode=2, metrics=True,
                                    scheduler_args=("--preemption-safety-margin-s", str(SAFETY_MARGIN_S))))
    yield stack
    stack.stop()


def greedy_texts(reference) -> dict[int, str]:
    prompt_ids = reference.prompt_ids(PROMPT)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {n: reference.text(reference.engine.generate(
            [prompt_ids], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))[0]) for n in (SHORT, LONG)}
    finally:
        torch.set_num_threads(threads)


def scheduler_metric(stack, name: str, labels: str) -> float:
    """Sum of the scheduler's `name` samples that carry every label of `labels` (a="x",b="y")."""
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_ports['scheduler']}/metrics", timeout=5) as r:
        lines = r.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines
               if line.startswith(name + "{") and all(label in line for label in labels.split(",")))


def test_preempt_notice_empties_a_loaded_decode_worker_before_its_deadline_losing_nothing(stack, reference):
    want = greedy_texts(reference)
    results: list = [None] * len(STREAMS)
    started = [threading.Event() for _ in STREAMS]

    def stream(i: int) -> None:
        parts, finish = [], None
        try:
            for chunk in client(stack).completions.create(model=MODEL, prompt=PROMPT, max_tokens=STREAMS[i],
                                                          temperature=0, stream=True, extra_body={"ignore_eos": True}):
                parts.append(chunk.choices[0].text)
                finish = chunk.choices[0].finish_reason or finish
                if len(parts) >= 2:
                    started[i].set()
            results[i] = ("".join(parts), finish)
        except Exception as e:  # noqa: BLE001 (reported by the assertions)
            results[i] = e
        started[i].set()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(STREAMS))]
    for t in threads:
        t.start()
    assert all(s.wait(120) for s in started), results
    decoding = [s for s in stack.worker_stats() if s.role == 2]           # ROLE_DECODE
    holder = max(decoding, key=lambda s: (sum(r.max_tokens > SHORT for r in s.load.requests), len(s.load.requests)))
    assert holder.load.requests, "no decode worker holds a request"

    def scheduler_sees_them() -> bool:        # its heartbeats may lag the engine's steps on a busy machine
        status = {i.instance.instance_id: i for i in stack.instances()}[holder.instance_id]
        return len(status.load.requests) > 0

    assert eventually(scheduler_sees_them, timeout=20, interval=0.1), "the scheduler never saw the requests"
    deadline = time.time() + DEADLINE_S
    with grpc.insecure_channel(stack.scheduler_address) as channel:
        reply = scheduler_pb2_grpc.SchedulerStub(channel).NotifyPreemption(scheduler_pb2.PreemptionNotice(
            instance_id=holder.instance_id, deadline_unix_s=deadline, source="admin"), timeout=10)
    assert reply.num_requests >= 1

    def empty() -> bool:
        stats = {s.instance_id: s for s in stack.worker_stats()}[holder.instance_id]
        return stats.load.num_running == 0 and stats.load.num_waiting == 0 and not stats.load.requests

    assert eventually(empty, timeout=deadline - time.time() - 1, interval=0.2), \
        f"{holder.instance_id} still holds requests before its deadline"
    emptied_in_s = DEADLINE_S - (deadline - time.time())
    assert eventually(lambda: scheduler_metric(stack, "ferry_scheduler_migrations_total",
                                               'reason="preemption",outcome="migrated"') >= 1, timeout=10), \
        "no request was live-migrated for the preemption"

    # The deadline: the scheduler judges the instance empty, then the cloud takes it.
    assert eventually(lambda: scheduler_metric(stack, "ferry_scheduler_preemption_deadlines_total",
                                               'outcome="empty"') == 1, timeout=deadline - time.time() + 5,
                      interval=0.2), "the scheduler did not judge the instance empty at its deadline"
    port = holder.instance_id.rsplit("-", 1)[1]                           # ROLE-HOST-PORT
    victim = next(proc for name, proc in stack.procs.items() if name.startswith("decode") and port in proc.args)
    os.killpg(victim.pid, signal.SIGKILL)

    for t in threads:
        t.join(240)
    errors = [r for r in results if not isinstance(r, tuple)]
    assert not errors, errors
    for n, (text, finish) in zip(STREAMS, results, strict=True):
        assert finish == "length", results
        assert text == want[n], f"max_tokens={n}: the stream differs from the uninterrupted greedy run"
    print(f"\npreempt: {holder.instance_id} held {reply.num_requests} requests; empty {emptied_in_s:.1f} s "
          f"after the notice (deadline {DEADLINE_S:.0f} s)")
