"""Greedy parity with HF transformers' generate() on the real SmolLM2-135M (CPU, float32).

Four ways through the engine — one request at a time, a batch of mixed lengths, a second pass that
hits the prefix cache, and chunked prefill under a tiny token budget — must all give exactly HF's
64 greedy tokens, and the logits of the last step must agree to 1e-3 (relative norm).
"""
from __future__ import annotations

import pytest

from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.sampling import SamplingParams
from tests.engine.recording import generate_recording_logits, hf_greedy

NUM_TOKENS = 64
GREEDY = SamplingParams(max_tokens=NUM_TOKENS, temperature=0, ignore_eos=True)
CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    ("Explain in two sentences why the sky is blue, then give one everyday example of the same "
    "effect that a child would recognise, and finish with a short question for the reader."),
]
RAW = ["The capital of France is", "def fibonacci(n):\n    "]


@pytest.fixture(scope="module")
def prompts(smollm2_path) -> list[list[int]]:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    chats = [tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True,
                                     tokenize=True, return_dict=False) for c in CHATS]
    return [list(p) for p in chats] + [tok(r).input_ids for r in RAW]


@pytest.fixture(scope="module")
def hf_reference(smollm2_path, prompts):
    """HF's greedy tokens and last-step logits for each prompt."""
    return [(tokens, logits[-1]) for tokens, logits in hf_greedy(smollm2_path, prompts, NUM_TOKENS)]


def run_recording_logits(engine: LLMEngine, prompts, params=GREEDY):
    """Generate, keeping each request's logits from the last step that sampled for it."""
    outputs, logits = generate_recording_logits(engine, prompts, params)
    return outputs, [steps[-1] for steps in logits]


def assert_parity(outputs, logits, hf_reference):
    for i, ((hf_tokens, hf_logits), ours, our_logits) in enumerate(zip(hf_reference, outputs, logits)):
        assert ours == hf_tokens, f"prompt {i}: tokens differ from HF"
        rel = float((our_logits - hf_logits).norm() / hf_logits.norm())
        assert rel < 1e-3, f"prompt {i}: last-step logits differ from HF by {rel:.2e} (relative)"


@pytest.fixture(scope="module")
def engine(smollm2_path) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(smollm2_path), kv_cache_memory_gb=0.25))


def test_engine_parity_single(engine, prompts, hf_reference):
    results = [run_recording_logits(engine, [p]) for p in prompts]
    assert_parity([r[0][0] for r in results], [r[1][0] for r in results], hf_reference)


def test_engine_parity_batched_mixed_lengths(engine, prompts, hf_reference):
    assert len({len(p) for p in prompts}) == len(prompts), "prompts should have mixed lengths"
    outputs, logits = run_recording_logits(engine, prompts)
    assert_parity(outputs, logits, hf_reference)


def test_engine_parity_prefix_cache_hits(smollm2_path, prompts, hf_reference):
    engine = LLMEngine(EngineConfig(model=str(smollm2_path), kv_cache_memory_gb=0.25))
    engine.generate(prompts, SamplingParams(max_tokens=1, temperature=0))   # warm the prefix cache
    hits_before = engine.kv.num_hit_blocks
    outputs, logits = run_recording_logits(engine, prompts)
    assert engine.kv.num_hit_blocks - hits_before >= sum((len(p) - 1) // 16 for p in prompts)
    assert_parity(outputs, logits, hf_reference)


def test_engine_parity_chunked_prefill(smollm2_path, prompts, hf_reference):
    engine = LLMEngine(EngineConfig(model=str(smollm2_path), kv_cache_memory_gb=0.25,
                                    max_num_seqs=4, max_num_batched_tokens=24))
    chunked = []
    run = engine.runner.run
    engine.runner.run = lambda step: chunked.append(any(not c.samples for c in step.chunks)) or run(step)
    outputs, logits = run_recording_logits(engine, prompts)
    assert any(chunked), "the token budget should have split some prompt into chunks"
    assert_parity(outputs, logits, hf_reference)
