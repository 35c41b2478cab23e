"""The prefill role's hand-off (services/worker/handoff.py) on real engines, in process.

A prefill engine with small chunks stages full blocks while the prompt computes; a decode engine
imports the stages; the request continues there with exactly the tokens an uninterrupted run makes.
"""
from __future__ import annotations

import pytest

from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.sampling import SamplingParams
from services.worker.handoff import Tracked, after_step

PROMPT = list(range(100, 190))            # 90 tokens: 5 full blocks of 16 and a partial one
PARAMS = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def engine(model, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model), num_blocks=64, max_num_seqs=4, **kw))


def run_prefill(prefill: LLMEngine, tracked: dict[str, Tracked]):
    """Step until the request's first token is out; every stage and output produced, in order."""
    stages, outputs = [], []
    while "r" in prefill.seqs:
        result = after_step(prefill, prefill.step(), tracked, write_store=True)
        stages += [payload for _, payload in result.stages]
        outputs += [out for _, out in result.outputs]
        if outputs:
            break
    return stages, outputs, result


@pytest.fixture(scope="module")
def reference(tiny_llama) -> list[int]:
    return engine(tiny_llama).generate([PROMPT], PARAMS)[0]


def test_stages_stream_during_prefill_and_decode_continues_exactly(tiny_llama, reference):
    # A 32-token step budget makes the 90-token prompt take 3 chunks: stages go out between them.
    prefill = engine(tiny_llama, max_num_batched_tokens=32)
    tracked = {"r": Tracked("r", sink="gw", hand_off=True)}
    prefill.add_request("r", PROMPT, PARAMS)
    stages, outputs, last = run_prefill(prefill, tracked)

    assert len(stages) >= 3, "blocks must stream while later chunks compute, then a final stage"
    assert [s.is_final for s in stages] == [False] * (len(stages) - 1) + [True]
    assert [s.first_block for s in stages] == [0] + [sum(s.num_blocks for s in stages[:i])
                                                     for i in range(1, len(stages))]
    assert sum(s.num_blocks for s in stages) == 6
    assert outputs[0].new_token_ids == (reference[0],)
    assert "r" not in prefill.seqs, "the prefill worker drops the request after the hand-off"
    assert prefill.kv.pool.num_free == prefill.kv.pool.num_blocks
    keys, data = last.store_writes[0]
    assert len(keys) == 5 and len(data) == 5 * prefill.layout.bytes_per_block

    decode = engine(tiny_llama)
    assert [decode.import_kv(s) for s in stages][-1] is True
    tokens = [reference[0]]
    while decode.has_unfinished:
        tokens += [t for out in decode.step() for t in out.new_token_ids]
    assert tokens == reference


def test_a_request_that_ends_on_its_first_token_is_not_handed_off(tiny_llama):
    prefill = engine(tiny_llama)
    tracked = {"r": Tracked("r", sink="gw", hand_off=True)}
    prefill.add_request("r", PROMPT, SamplingParams(max_tokens=1, temperature=0))
    stages, outputs, _ = run_prefill(prefill, tracked)
    assert outputs[0].finished and outputs[0].finish_reason == "length"
    assert [s for s in stages if s.is_final] == []


def test_colocated_requests_are_not_staged(tiny_llama):
    both = engine(tiny_llama, max_num_batched_tokens=32)
    tracked = {"r": Tracked("r", sink="gw", hand_off=False)}
    both.add_request("r", PROMPT, PARAMS)
    stages, outputs, _ = run_prefill(both, tracked)
    assert stages == [] and len(outputs) == 1
    assert "r" in both.seqs, "a colocated request keeps decoding where it is"


def test_blocks_from_the_kvstore_become_prefix_hits(tiny_llama, reference):
    """What the prefill worker does with kvstore blocks: `cache_blocks`, then the request hits them."""
    source = engine(tiny_llama)
    tracked = {"r": Tracked("r", sink="gw", hand_off=False)}
    source.add_request("r", PROMPT, PARAMS)
    _, _, result = run_prefill(source, tracked)
    keys, data = result.store_writes[0]
    blocks = [data[i * source.layout.bytes_per_block:(i + 1) * source.layout.bytes_per_block]
              for i in range(len(keys))]

    import torch
    target = engine(tiny_llama)
    tensor = torch.frombuffer(bytearray(b"".join(blocks)), dtype=torch.float32).view(len(keys),
                                                                                      *target.layout.block_shape)
    assert target.cache_blocks(keys, tensor) == 5
    assert target.cache_blocks(keys, tensor) == 0, "keys cached already are skipped"
    assert target.num_cached_prefix_blocks(keys) == 5
    assert target.kv.pool.num_free == target.kv.pool.num_blocks, "cached blocks stay reusable"
    assert target.generate([PROMPT], PARAMS)[0] == reference
    assert target.kv.num_hit_blocks == 5
