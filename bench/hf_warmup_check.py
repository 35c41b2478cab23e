"""How HF generate()'s decode step time changes over repeated calls (Llama-3-8B shape, bf16).
Prints each (T(1+n) - T(1)) / n sample and whether torch.compile ran inside generate()."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.engine import LLAMA3_8B


def main() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.for_model(**{k: v for k, v in LLAMA3_8B.items() if k != "architectures"})
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    model.generation_config.eos_token_id = None
    print("cache_implementation", model.generation_config.cache_implementation,
          "compile_config", getattr(model.generation_config, "compile_config", None))
    for batch in (1, 32):
        ids = torch.randint(0, 128256, (batch, 512), device="cuda")

        def run(n, ids=ids):
            torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.inference_mode():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False)
            torch.cuda.synchronize()
            return time.perf_counter() - start

        samples = []
        for _ in range(6):
            t33, t1 = run(33), run(1)
            samples.append((t33 - t1) / 32 * 1e3)
        print(f"batch {batch}: ms/step per sample {[round(s, 1) for s in samples]}")
    from torch._dynamo.utils import counters
    print("dynamo frames compiled:", dict(counters.get("stats", {})))


if __name__ == "__main__":
    main()
