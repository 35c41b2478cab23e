"""A decode worker goes away in the middle of a streamed request and the client does not notice: the
gateway resumes the request on another decode worker from the tokens it already has, and the text is
the uninterrupted greedy output, token for token.

    kill -9   the process dies; the gateway sees its token stream break, finds it gone, recomputes
    SIGTERM   the worker checkpoints the request's KV to the kvstore and says "resume": the resumed
              prefill is a kvstore prefix hit

One stack with three decode workers serves both tests (each takes one away; a third is left for the
second test to resume on).
"""
from __future__ import annotations

import os
import signal
import threading
import urllib.request

import grpc
import pytest
import torch

from services.engine.sampling import SamplingParams
from services.gen.ferry.v1 import worker_pb2, worker_pb2_grpc
from tests.integration.stack import MODEL, Shape, Stack, client, start_stack
from tests.procs import eventually

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPT = "Write a long story about a lighthouse keeper and the storm that changed everything."
MAX_TOKENS = 160
ROLE_DECODE = 2


@pytest.fixture(scope="module")
def stack(tmp_path_factory, smollm2_path):
    stack = start_stack("resume", tmp_path_factory.mktemp("resume"), smollm2_path,
                        shape=Shape(num_decode=3, metrics=True))
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def want(reference) -> str:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ids = reference.engine.generate([reference.prompt_ids(PROMPT)],
                                        SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))[0]
    finally:
        torch.set_num_threads(threads)
    return reference.text(ids)


class Streamer(threading.Thread):
    """One greedy streamed completion through the official client."""

    def __init__(self, stack: Stack, midway: int = 16) -> None:
        super().__init__()
        self.stack, self.num_midway = stack, midway
        self.parts: list[str] = []
        self.finish: str | None = None
        self.error: Exception | None = None
        self.midway = threading.Event()
        self.start()

    def run(self) -> None:
        try:
            for chunk in client(self.stack).completions.create(
                    model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stream=True,
                    extra_body={"ignore_eos": True}):
                self.parts.append(chunk.choices[0].text)
                if len(self.parts) >= self.num_midway:
                    self.midway.set()
                self.finish = chunk.choices[0].finish_reason or self.finish
        except Exception as e:  # noqa: BLE001 (reported by the test)
            self.error = e
        self.midway.set()

    @property
    def text(self) -> str:
        return "".join(self.parts)


def decode_holding_a_request(stack: Stack) -> str:
    """The name of the decode process running a request (its port is in the instance's address)."""
    def holder() -> str | None:
        for status in stack.instances():
            if status.instance.role != ROLE_DECODE:
                continue
            try:
                with grpc.insecure_channel(status.instance.address) as channel:
                    stats = worker_pb2_grpc.WorkerStub(channel).Stats(worker_pb2.StatsRequest(), timeout=2)
            except grpc.RpcError:           # the worker the first test killed (listed until it expires)
                continue
            if stats.load.requests:
                return status.instance.address
        return None

    assert eventually(lambda: holder() is not None, timeout=30, interval=0.05)
    port = holder().rsplit(":", 1)[1]
    return next(name for name, proc in stack.procs.items()
                if name.startswith("decode") and f" --port {port} " in " ".join(map(str, proc.args)) + " ")


def metric(stack: Stack, name: str, process: str = "gateway") -> float:
    """Sum of a metric's samples on one process's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_ports[process]}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and ("{" in name or line[len(name):len(name) + 1] in (" ", "{")))


def test_kill_9_of_the_decode_worker_mid_stream_resumes_with_identical_output(stack, want):
    before = metric(stack, "ferry_gateway_request_resumes_total")
    stream = Streamer(stack)
    assert stream.midway.wait(120)
    victim = decode_holding_a_request(stack)
    os.killpg(stack.procs[victim].pid, signal.SIGKILL)
    stream.join(240)
    stack.procs.pop(victim).wait(10)                 # gone for good: the stack does not stop it again
    assert stream.error is None, stream.error
    assert stream.finish == "length"
    assert stream.text == want                       # no token lost, repeated or changed
    assert metric(stack, "ferry_gateway_request_resumes_total") >= before + 1


def test_sigterm_checkpoints_the_kv_and_the_resume_is_a_kvstore_hit(stack, want):
    resumes = metric(stack, "ferry_gateway_request_resumes_total")
    cached = metric(stack, "ferry_gateway_resume_cached_tokens_total")
    store_hits = metric(stack, "ferry_kvstore_hits_total", "kvstore")
    stream = Streamer(stack, midway=64)     # well past the prompt's blocks, which the prefill worker caches
    assert stream.midway.wait(120)
    victim = decode_holding_a_request(stack)
    os.killpg(stack.procs[victim].pid, signal.SIGTERM)
    stream.join(240)
    assert stack.procs.pop(victim).wait(30) == 0, "the worker stops cleanly"
    assert stream.error is None, stream.error
    assert stream.finish == "length"
    assert stream.text == want
    assert metric(stack, "ferry_gateway_request_resumes_total") >= resumes + 1
    # the stopping worker said "resume" (not a broken stream), and its checkpoint served the prefill
    assert metric(stack, 'ferry_gateway_request_resumes_total{reason="worker_stopping"') >= 1
    assert metric(stack, "ferry_gateway_resume_cached_tokens_total") > cached
    assert metric(stack, "ferry_kvstore_hits_total", "kvstore") > store_hits
