"""Test helper: run `engine.generate` while keeping the logits of every step, per request."""
from __future__ import annotations

import torch

from services.engine.engine import LLMEngine
from services.engine.sampling import SamplingParams


def generate_recording_logits(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams
                              ) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
    """Output tokens per prompt, and per prompt the logits of each step that sampled for it."""
    seen: dict[str, list[torch.Tensor]] = {}
    run = engine.runner.run

    def recording_run(step):
        logits = run(step)
        for chunk, row in zip([c for c in step.chunks if c.samples], logits):
            seen.setdefault(chunk.seq.request_id, []).append(row.clone())
        return logits

    engine.runner.run = recording_run
    try:
        outputs = engine.generate(prompts, params)
    finally:
        engine.runner.run = run
    in_order = sorted(seen, key=lambda rid: int(rid.rsplit("-", 1)[1]))   # generate's ids end in -<index>
    return outputs, [seen[rid] for rid in in_order]


def hf_greedy(folder, prompts: list[list[int]], num_tokens: int) -> list[tuple[list[int], list[torch.Tensor]]]:
    """HF transformers' greedy tokens and per-step logits, one prompt at a time (no padding).

    EOS does not stop it (like `ignore_eos`, and without min_new_tokens' EOS suppression), and the
    attention mask is explicit: chat prompts contain <|im_end|>, which HF would take for padding."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    results = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=num_tokens,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True)
            results.append((out.sequences[0, len(p):].tolist(), [step[0].float() for step in out.logits]))
    return results
