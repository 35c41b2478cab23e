"""The scheduler drains a decode worker with a stream in flight: the request is live-migrated away and
the client's stream, through the gateway and the official client, continues with every token once."""
from __future__ import annotations

import threading

import grpc
import pytest
import torch

from services.engine.sampling import SamplingParams
from services.gen.ferry.v1 import scheduler_pb2, scheduler_pb2_grpc
from tests.integration.stack import MODEL, Shape, client, start_stack
from tests.procs import eventually

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPT = "Write a long story about a lighthouse keeper and the storm that changed everything."
MAX_TOKENS = 160


@pytest.fixture(scope="module")
def two_decode_stack(tmp_path_factory, smollm2_path):
    stack = start_stack("migration-drain", tmp_path_factory.mktemp("migration-drain"), smollm2_path,
                        shape=Shape(num_decode=2))
    yield stack
    stack.stop()


def test_migration_drain_moves_a_streaming_request_and_output_is_unchanged(two_decode_stack, reference):
    stack = two_decode_stack
    prompt_ids = reference.prompt_ids(PROMPT)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = reference.engine.generate([prompt_ids], SamplingParams(max_tokens=MAX_TOKENS, temperature=0,
                                                                      ignore_eos=True))[0]
    finally:
        torch.set_num_threads(threads)

    parts: list[str] = []
    first_tokens = threading.Event()
    result: dict = {}

    def stream() -> None:
        try:
            for chunk in client(stack).completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                                          temperature=0, stream=True,
                                                          extra_body={"ignore_eos": True}):
                parts.append(chunk.choices[0].text)
                if len(parts) >= 8:
                    first_tokens.set()
                result["finish"] = chunk.choices[0].finish_reason or result.get("finish")
        except Exception as e:  # noqa: BLE001 (reported by the assertion below)
            result["error"] = e
        first_tokens.set()

    thread = threading.Thread(target=stream)
    thread.start()
    assert first_tokens.wait(120)
    holder = next(s for s in stack.worker_stats() if s.role == 2 and s.load.requests)   # ROLE_DECODE
    with grpc.insecure_channel(stack.scheduler_address) as channel:
        reply = scheduler_pb2_grpc.SchedulerStub(channel).DrainInstance(
            scheduler_pb2.DrainInstanceRequest(instance_id=holder.instance_id), timeout=10)
    assert reply.num_requests >= 1

    def drained() -> bool:
        stats = {s.instance_id: s for s in stack.worker_stats()}
        return stats[holder.instance_id].load.num_running == 0

    assert eventually(drained, timeout=60, interval=0.1), "the drained worker still runs the request"
    thread.join(180)
    assert "error" not in result, result.get("error")
    assert result["finish"] == "length"
    assert "".join(parts) == reference.text(want)          # no token lost, repeated or changed
    assert eventually(stack.idle, timeout=30, interval=0.2)   # and no block left behind anywhere
