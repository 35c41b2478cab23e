"""`ferry generate`: run prompts through the engine and print the completions (and the speed)."""
from __future__ import annotations

import argparse
import os
import time

from services.engine.sampling import SamplingParams


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ferry generate", description="Generate text with the Ferry engine.")
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help="one or more prompts (batched together)")
    p.add_argument("--model", default="models/SmolLM2-135M-Instruct", help="HF-format model folder")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--raw", action="store_true", help="send prompts as they are, without the chat template")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from services.engine.config import EngineConfig
    from services.engine.engine import LLMEngine
    from services.engine.stopping import truncate_at_stop

    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed, stop=tuple(args.stop))
        engine = LLMEngine(EngineConfig(model=args.model, device=args.device, dtype=args.dtype))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}")
        return 2
    tok = engine.tokenizer
    if args.raw or tok.chat_template is None:
        prompts = [tok(p).input_ids for p in args.prompts]
    else:
        prompts = [list(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                tokenize=True, return_dict=False)) for p in args.prompts]
    start = time.perf_counter()
    outputs = engine.generate(prompts, params)
    seconds = time.perf_counter() - start
    for prompt, out in zip(args.prompts, outputs):
        text = truncate_at_stop(tok.decode(out, skip_special_tokens=True), params.stop)
        print(f"--- {prompt}\n{text}\n")
    num = sum(len(o) for o in outputs)
    print(f"{num} tokens in {seconds:.2f} s ({num / seconds:.1f} tok/s) on {args.device}, {args.dtype}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
