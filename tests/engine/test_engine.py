"""LLMEngine end to end on a tiny random model: preemption, stopping, abort, validation, seeds."""
from __future__ import annotations

import pytest

from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
PROMPTS = [list(range(100 + 7 * i, 130 + 7 * i)) for i in range(4)]     # 30 tokens each


def engine_for(tiny_llama, **overrides) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(tiny_llama), **{"num_blocks": 256, **overrides}))


def run(engine: LLMEngine) -> dict[str, list]:
    """Step until idle; every output per request id."""
    outputs: dict[str, list] = {}
    while engine.has_unfinished:
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    return outputs


def test_engine_preempts_by_recompute_and_loses_nothing(tiny_llama):
    expected = engine_for(tiny_llama).generate(PROMPTS, GREEDY)
    small = engine_for(tiny_llama, num_blocks=10)          # 160 slots for 4 x 70 tokens
    assert small.generate(PROMPTS, GREEDY) == expected
    assert small.num_preemptions > 0
    assert small.kv.num_free_blocks == 10


def test_engine_stops_at_a_stop_string_and_a_stop_token(tiny_llama, smollm2_path):
    # smollm2_path: the tiny model borrows SmolLM2's tokenizer, which stop strings need
    engine = engine_for(tiny_llama)
    free = engine.generate(PROMPTS[:1], GREEDY)[0]
    text = engine.detokenize(free)
    stop = text[len(text) // 2:len(text) // 2 + 3]
    engine.add_request("s", PROMPTS[0], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True,
                                                       stop=(stop,)))
    last = run(engine)["s"][-1]
    assert (last.finish_reason, last.stop_reason) == ("stop", stop)
    assert last.num_output_tokens < 40 and stop in engine.detokenize(free[:last.num_output_tokens])
    token = free[10]
    engine.add_request("t", PROMPTS[0], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True,
                                                       stop_token_ids=(token,)))
    last = run(engine)["t"][-1]
    assert (last.finish_reason, last.stop_reason, last.num_output_tokens) == ("stop", token, free.index(token) + 1)


def test_engine_abort_frees_blocks_and_other_requests_go_on(tiny_llama):
    engine = engine_for(tiny_llama, num_blocks=64)
    engine.add_request("keep", PROMPTS[0], GREEDY)
    engine.add_request("drop", PROMPTS[1], GREEDY)
    for _ in range(5):
        engine.step()
    assert engine.abort("drop") and not engine.abort("drop") and not engine.abort("never-seen")
    outputs = run(engine)
    assert "drop" not in outputs and outputs["keep"][-1].finish_reason == "length"
    assert engine.kv.num_free_blocks == 64


@pytest.mark.parametrize("request_id, prompt, params, message", [
    ("dup", [1, 2, 3], GREEDY, "already in use"),
    ("empty", [], GREEDY, "prompt is empty"),
    ("vocab", [1, 49152], GREEDY, "must be integers in"),
    ("long", [1] * 1000, SamplingParams(max_tokens=100), "exceeds the model's context of 1024"),
    ("blocks", [1] * 100, SamplingParams(max_tokens=200), "needs 19 KV blocks but this worker has 16"),
])
def test_engine_rejects_bad_requests_with_a_clear_message(tiny_llama, request_id, prompt, params, message):
    engine = engine_for(tiny_llama, num_blocks=16)
    engine.add_request("dup", [1, 2, 3], GREEDY)
    with pytest.raises(ValueError, match=message):
        engine.add_request(request_id, prompt, params)


def test_engine_seeded_sampling_does_not_depend_on_the_batch(tiny_llama):
    seeded = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=1234)
    alone = engine_for(tiny_llama).generate(PROMPTS[:1], seeded)[0]
    batched = engine_for(tiny_llama).generate(PROMPTS, [seeded, GREEDY, GREEDY, seeded])
    assert batched[0] == alone and batched[3] != alone
