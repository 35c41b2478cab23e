"""A stack of sim workers (`--engine sim`): 1 prefill + 2 decode, no model weights, paced in real time.

Same processes and protocol as the model stack (registration, Prefill → PushKV hand-off with real
bytes, TokenSink), only the arithmetic is a performance model. The placeholder tokens are a function
of the request's seed and position, so the expected text is known without running anything.
"""
from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from transformers import AutoTokenizer

from services.engine.config import EngineConfig
from services.engine.sampling import SamplingParams
from services.engine.sim_engine import SimEngine, SimProfile
from services.gen.ferry.v1 import common_pb2
from tests.integration.stack import MODEL, Shape, Stack, client, complete, start_stack
from tests.procs import eventually

pytestmark = pytest.mark.integration

PROFILE = "llama3-8b-h100"         # ~6 ms a decode step: fast, and slow enough to see requests overlap


@pytest.fixture(scope="module")
def sim_stack(tmp_path_factory, smollm2_path):
    shape = Shape(num_decode=2, engine="sim", sim_profile=PROFILE)
    stack = start_stack("sim", tmp_path_factory.mktemp("sim"), smollm2_path, shape=shape)
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    return AutoTokenizer.from_pretrained(smollm2_path)


def expected_text(tokenizer, seed: int, max_tokens: int) -> str:
    """What a sim worker generates for this seed, detokenized as the gateway does. The workers cap the
    profile's vocabulary (128256) to the served model's (49152), so every id is a token of it."""
    profile = dataclasses.replace(SimProfile.load(PROFILE), vocab_size=len(tokenizer))
    engine = SimEngine(EngineConfig(model="-"), profile, num_blocks=64)
    ids = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=max_tokens, seed=seed))[0]
    assert max(ids) < len(tokenizer)
    return tokenizer.decode(ids, skip_special_tokens=True)


def test_sim_workers_register_with_the_served_model_name(sim_stack: Stack):
    instances = [s for s in sim_stack.instances() if s.healthy]
    roles = sorted(s.instance.role for s in instances)
    assert roles == sorted([common_pb2.ROLE_PREFILL, common_pb2.ROLE_DECODE, common_pb2.ROLE_DECODE])
    assert {s.instance.model for s in instances} == {MODEL}
    assert [m.id for m in client(sim_stack).models.list().data] == [MODEL]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_sim_request_reaches_max_tokens_with_the_seeded_text(sim_stack: Stack, tokenizer, kind, stream):
    max_tokens = 40                   # no EOS in the sim engine: every request runs to max_tokens
    text, finish, usage = complete(sim_stack, kind, stream, max_tokens=max_tokens, seed=1234)
    assert finish == "length"
    assert usage.completion_tokens == max_tokens
    assert text == expected_text(tokenizer, 1234, max_tokens)


def test_sim_load_spreads_over_both_decode_workers(sim_stack: Stack):
    decode_ids = {s.instance.instance_id for s in sim_stack.instances()
                  if s.instance.role == common_pb2.ROLE_DECODE}
    busy: set[str] = set()            # decode workers seen with a running request
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            busy.update(s.instance_id for s in sim_stack.worker_stats()
                        if s.instance_id in decode_ids and s.load.num_running > 0)
            done.wait(0.02)

    def one(seed: int):
        return complete(sim_stack, "completion", False, max_tokens=128, seed=seed,
                        prompt=f"Request number {seed}: tell me a story.")

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(8)))
    finally:
        done.set()
        watcher.join(5)
    assert [(finish, usage.completion_tokens) for _, finish, usage in results] == [("length", 128)] * 8
    assert busy == decode_ids, f"requests ran on {sorted(busy)} of {sorted(decode_ids)}"
    assert eventually(sim_stack.idle, timeout=5, interval=0.1), "every block is free again"
