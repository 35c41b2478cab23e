"""The real engine (SmolLM2-135M on CPU) refuses KV payloads that do not fit its layout or their own
bytes, and its pool is untouched: the free block count is back, and the correct payload imported
afterwards continues the request to the same greedy output as an uninterrupted run."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.kv_transfer import KVPayload
from services.engine.sampling import SamplingParams

pytestmark = pytest.mark.slow

MAX_TOKENS = 8
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)


@pytest.fixture(scope="module")
def engine(smollm2_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                 # other tests' processes may hold the other cores
    yield LLMEngine(EngineConfig(model=str(smollm2_path), kv_cache_memory_gb=0.25))
    torch.set_num_threads(threads)


def with_layout(p: KVPayload, **changes) -> KVPayload:
    """The payload with another layout and zero bytes sized for it: only the layout is wrong."""
    layout = dataclasses.replace(p.layout, **changes)
    return dataclasses.replace(p, layout=layout, data=bytes(p.num_blocks * layout.bytes_per_block))


def test_bad_payloads_are_refused_and_the_pool_and_output_are_intact(engine):
    prompt = engine.tokenizer.encode("Paris is the capital and largest city of France. It is known for its museums, "
                                     "its food and its long history. The river that runs through Paris is")
    assert len(prompt) > engine.layout.block_size             # two blocks: two stages below
    expected = engine.generate([prompt], GREEDY)[0]
    engine.add_request("moved", prompt, GREEDY)
    while not engine.seqs["moved"].num_output_tokens:
        engine.step()
    first = engine.export_kv("moved", slice(0, 1))
    rest = engine.export_kv("moved", slice(1, None))
    whole = dataclasses.replace(engine.export_kv("moved"), block_keys=())   # no prefix hits: every byte is written
    engine.abort("moved")
    free = engine.kv.pool.num_free

    bad = [with_layout(whole, model_id="Llama-3-8B"), with_layout(whole, dtype="bfloat16"),
           with_layout(whole, block_size=whole.layout.block_size // 2), with_layout(whole, num_layers=2),
           with_layout(whole, num_kv_heads=whole.layout.num_kv_heads * 2),
           dataclasses.replace(whole, token_ids=(*whole.token_ids[:-1], 10**6))]
    for payload, word in zip(bad, ["model_id", "dtype", "block_size", "num_layers", "num_kv_heads", "vocabulary"],
                             strict=True):
        with pytest.raises(ValueError, match=word):
            engine.import_kv(payload)
        assert engine.kv.pool.num_free == free and "moved" not in engine.seqs
    for cut in (1, len(whole.data) // 2, len(whole.data)):            # truncated bytes never make a payload
        with pytest.raises(ValueError, match="truncated"):
            KVPayload.from_chunks(whole.meta(), [bytes(whole.data)[:-cut]])

    # A good first stage, then a bad one: the worker aborts the request, which frees the staged blocks.
    assert engine.import_kv(first) is False
    assert engine.kv.pool.num_free < free
    with pytest.raises(ValueError):
        engine.import_kv(with_layout(rest, dtype="float16"))
    engine.abort("moved")
    assert engine.kv.pool.num_free == free

    assert engine.import_kv(whole) is True
    output = list(whole.token_ids[len(prompt):])
    while engine.has_unfinished:
        for out in engine.step():
            output += out.new_token_ids
    assert output == expected
    assert engine.kv.pool.num_free == engine.kv.pool.num_blocks
