"""`LLMEngine` against HF transformers on tiny random-weight models of each supported variant.

Each variant exercises a code path SmolLM2 does not: Llama 3 RoPE scaling, Qwen2's q/k/v biases,
Mistral, and an lm_head that is not the embedding matrix. Greedy tokens must equal HF `generate`
and first-step logits must match HF's forward; bfloat16 must stay close to float32.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from services.engine.config import EngineConfig, ModelConfig
from services.engine.engine import LLMEngine
from services.engine.sampling import SamplingParams
from tests.conftest import make_tiny_model
from tests.engine.recording import generate_recording_logits, hf_greedy

NUM_TOKENS = 24
GREEDY = SamplingParams(max_tokens=NUM_TOKENS, temperature=0, ignore_eos=True)
PROMPT_LENS = (5, 19, 40)             # inside one block, across two, across three (block_size 16)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
VARIANTS = {
    "llama3-rope-scaling": ("llama", {"rope_parameters": LLAMA3_ROPE}),
    "qwen2-qkv-bias": ("qwen2", {}),
    "mistral": ("mistral", {}),
    "untied-lm-head": ("llama", {"tie_word_embeddings": False}),
}
# With HF's default init (std 0.02) a tiny model with tied embeddings greedily repeats one token
# forever, which would make token parity trivial; std 0.2 gives 24 different tokens per prompt.
INIT_STD = 0.2


def randomize_biases(folder) -> None:
    """HF initializes biases to zero, which would hide a bias that is loaded wrong or not at all."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        biases = [p for name, p in model.named_parameters() if name.endswith(".bias")]
        assert biases, "this variant should have q/k/v biases"
        for p in biases:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    model.save_pretrained(folder)


@pytest.fixture(scope="module", params=list(VARIANTS), ids=list(VARIANTS))
def variant(request, tmp_path_factory):
    model_type, overrides = VARIANTS[request.param]
    folder = make_tiny_model(tmp_path_factory.mktemp(request.param), model_type, initializer_range=INIT_STD,
                             **overrides)
    if model_type == "qwen2":
        randomize_biases(folder)
    return request.param, folder


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, 49152, (n,), generator=gen).tolist() for n in PROMPT_LENS]


def hf_greedy_first_logits(folder, prompts) -> list[tuple[list[int], torch.Tensor]]:
    """HF's greedy tokens and first-step logits, one prompt at a time (no padding)."""
    return [(tokens, logits[0]) for tokens, logits in hf_greedy(folder, prompts, NUM_TOKENS)]


@pytest.fixture(scope="module")
def hf_reference(variant, prompts):
    return hf_greedy_first_logits(variant[1], prompts)


def generate_with_first_logits(engine: LLMEngine, prompts, params=GREEDY):
    """Generate, keeping each request's logits from the first step that sampled for it."""
    outputs, logits = generate_recording_logits(engine, prompts, params)
    return outputs, [steps[0] for steps in logits]


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).norm() / reference.norm())


@pytest.fixture(scope="module")
def engine_run(variant, prompts):
    engine = LLMEngine(EngineConfig(model=str(variant[1]), num_blocks=64))
    return generate_with_first_logits(engine, prompts)


def test_variant_exercises_its_feature(variant):
    name, folder = variant
    config = ModelConfig.from_folder(folder)
    checks = {
        "llama3-rope-scaling": config.rope_scaling is not None and config.rope_theta == 500000.0,
        "qwen2-qkv-bias": config.qkv_bias,
        "mistral": config.model_type == "mistral",
        "untied-lm-head": not config.tie_word_embeddings,
    }
    assert checks[name], f"{name}: {config}"


def test_variant_greedy_tokens_equal_hf_generate(engine_run, hf_reference):
    outputs, _ = engine_run
    assert all(len(set(hf_tokens)) > NUM_TOKENS // 2 for hf_tokens, _ in hf_reference), "degenerate model"
    for i, (ours, (hf_tokens, _)) in enumerate(zip(outputs, hf_reference)):
        assert ours == hf_tokens, f"prompt {i} ({PROMPT_LENS[i]} tokens): tokens differ from HF"


def test_variant_first_step_logits_match_hf_forward(engine_run, hf_reference):
    _, logits = engine_run
    for i, (ours, (_, hf_logits)) in enumerate(zip(logits, hf_reference)):
        rel = relative_error(ours, hf_logits)
        assert rel < 1e-4, f"prompt {i}: first-step logits differ from HF by {rel:.2e} (relative)"


def test_variant_in_bfloat16_stays_close_to_float32_hf(variant, prompts, tmp_path):
    # HF's default init: at std 0.2 bfloat16 rounding alone (HF's own bfloat16 model included)
    # moves the logits by up to 3%, at std 0.02 by about 0.5%.
    name, _ = variant
    model_type, overrides = VARIANTS[name]
    folder = make_tiny_model(tmp_path / name, model_type, **overrides)
    if model_type == "qwen2":
        randomize_biases(folder)
    engine = LLMEngine(EngineConfig(model=str(folder), num_blocks=64, dtype="bfloat16"))
    assert engine.runner.kv_cache.dtype == torch.bfloat16
    _, logits = generate_with_first_logits(engine, prompts, SamplingParams(max_tokens=1, temperature=0))
    for i, (ours, hf_logits) in enumerate(zip(logits, hf_last_logits(folder, prompts))):
        rel = relative_error(ours, hf_logits)
        assert rel < 2e-2, f"prompt {i}: bfloat16 logits differ from float32 HF by {rel:.2e} (relative)"


def hf_last_logits(folder, prompts) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        return [model(torch.tensor([p])).logits[0, -1].float() for p in prompts]


# ---- config errors -------------------------------------------------------------------------------
def edit_config(folder, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("changes, field", [
    ({"model_type": "gpt_neox"}, "model_type"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}}, "rope_type"),
    ({"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_unsupported_config_raises_value_error_naming_the_field(tiny_llama, tmp_path, changes, field):
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama, folder)
    edit_config(folder, **changes)
    with pytest.raises(ValueError, match=field):
        LLMEngine(EngineConfig(model=str(folder), num_blocks=8))


def test_qkv_the_same_size_as_gate_up_loads_correctly(tmp_path, prompts):
    # hidden 64, 4 heads, 4 KV heads: q|k|v has 192 rows, and so has gate|up with intermediate 96.
    folder = make_tiny_model(tmp_path / "model", "llama", num_key_value_heads=4, intermediate_size=96,
                             initializer_range=INIT_STD)
    engine = LLMEngine(EngineConfig(model=str(folder), num_blocks=64))
    _, logits = generate_with_first_logits(engine, prompts[:1], SamplingParams(max_tokens=1, temperature=0))
    (_, hf_logits), = hf_greedy_first_logits(folder, prompts[:1])
    assert relative_error(logits[0], hf_logits) < 1e-4
