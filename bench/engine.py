"""Engine throughput against HF transformers' generate(), measured in the same process.

    python bench/engine.py --device cpu  --json out.json   # SmolLM2-135M fp32: tok/s at batch 1 and 8
    python bench/engine.py --device cuda --json out.json   # Llama-3-8B-shaped bf16, random weights:
        decode ms/step at batch 1/8/32/64 beside the HBM floor, prefill tok/s, HF generate()

The HBM floor of a decode step is (weight bytes + KV bytes read) / copy bandwidth, where the copy
bandwidth is measured here as (bytes read + bytes written) / time of a large device-to-device copy.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from services.engine.config import EngineConfig, ModelConfig
from services.engine.engine import LLMEngine
from services.engine.sampling import SamplingParams

TEXTS = [
    "The capital of France is",
    "Write a short story about a robot who learns to paint.",
    "def quicksort(items):",
    "Explain the difference between a process and a thread in an operating system.",
    "Once upon a time, in a village at the edge of a great forest, there lived",
    "List three facts about the moon.",
    "Translate to French: The weather is nice today and we are going to the beach.",
    "The three laws of thermodynamics are",
]
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-5, "max_position_embeddings": 8192,
    "rope_theta": 500000.0, "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 128000,
    "eos_token_id": 128001,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(w) for c, w in zip(columns, widths)))


def _fmt(v) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


# ---- CPU: SmolLM2 against HF generate() ---------------------------------------------------------
def bench_cpu(args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    tok.padding_side = "left"
    engine = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype))
    hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=engine.runner.dtype).eval()
    hf.generation_config.eos_token_id = None
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    rows = []
    for batch in args.batches:
        texts = (TEXTS * batch)[:batch]
        prompts = [tok(t).input_ids for t in texts]
        engine.generate(prompts, SamplingParams(max_tokens=4, temperature=0))          # warm-up
        enc = tok(texts, return_tensors="pt", padding=True)
        with torch.inference_mode():
            hf.generate(**enc, max_new_tokens=4, do_sample=False)
        ferry_s, hf_s = [], []
        for _ in range(args.repeats):                                                 # interleaved
            start = time.perf_counter()
            engine.generate(prompts, params)
            ferry_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            with torch.inference_mode():
                hf.generate(**enc, max_new_tokens=args.output_len, do_sample=False)
            hf_s.append(time.perf_counter() - start)
        n = batch * args.output_len
        row = {"batch": batch, "ferry_tok_s": n / statistics.median(ferry_s), "hf_tok_s": n / statistics.median(hf_s)}
        row["speedup"] = row["ferry_tok_s"] / row["hf_tok_s"]
        rows.append(row)
    print(f"\nSmolLM2-135M-Instruct, {args.dtype}, CPU x{torch.get_num_threads()} threads, "
          f"{args.output_len} output tokens/request, median of {args.repeats}")
    print_table(rows, ["batch", "ferry_tok_s", "hf_tok_s", "speedup"])
    print(f"peak RSS {peak_rss_mb():.0f} MB")
    return {"device": "cpu", "model": args.model, "dtype": args.dtype, "output_len": args.output_len,
            "rows": rows, "peak_rss_mb": peak_rss_mb()}


# ---- CUDA: Llama-3-8B-shaped, random weights --------------------------------------------------
def copy_bandwidth(device: str, gib: float = 4.0) -> float:
    """(bytes read + bytes written) / s of a large device-to-device copy; median of 20."""
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(25):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * gib * 2**30 / statistics.median(times[5:])


def timed_decode_steps(engine: LLMEngine, batch: int, prompt_len: int, steps: int) -> float:
    """Seconds per decode step with `batch` running requests whose prompts are `prompt_len` long."""
    gen = torch.Generator().manual_seed(batch)
    ids = [f"b{batch}-{i}" for i in range(batch)]
    for rid in ids:
        prompt = torch.randint(0, engine.vocab_size, (prompt_len,), generator=gen).tolist()
        engine.add_request(rid, prompt, SamplingParams(max_tokens=steps + 16, temperature=0, ignore_eos=True))
    while any(engine.seqs[r].num_output_tokens == 0 for r in ids):
        engine.step()
    for _ in range(3):
        engine.step()
    samples = []
    for _ in range(3):      # median of three timed runs of `steps // 3` steps
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps // 3):
            engine.step()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) / (steps // 3))
    for rid in ids:
        engine.abort(rid)
    return statistics.median(samples)


def timed_prefill(engine: LLMEngine, batch: int, prompt_len: int) -> float:
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, engine.vocab_size, (prompt_len,), generator=gen).tolist() for _ in range(batch)]
    engine.generate(prompts[:1], SamplingParams(max_tokens=1))     # warm-up
    engine.kv.enable_prefix_caching = False
    torch.cuda.synchronize()
    start = time.perf_counter()
    engine.generate(prompts, SamplingParams(max_tokens=1, temperature=0))
    torch.cuda.synchronize()
    engine.kv.enable_prefix_caching = True
    return batch * prompt_len / (time.perf_counter() - start)


def hf_decode_step(model, vocab: int, batch: int, prompt_len: int, steps: int) -> float:
    """Seconds per decode step of HF generate(): (time for 1+steps tokens - time for 1) / steps,
    median of three (HF's step is CPU-bound, so it varies from run to run)."""
    ids = torch.randint(0, vocab, (batch, prompt_len), device="cuda")
    mask = torch.ones_like(ids)

    def run(n):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    run(2)
    return statistics.median((run(steps + 1) - run(1)) / steps for _ in range(3))


def bench_cuda(args) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="llama3-8b-shape-"))
    (folder / "config.json").write_text(json.dumps(LLAMA3_8B))
    mc = ModelConfig.from_folder(folder)
    bw = copy_bandwidth("cuda")
    build = time.perf_counter()
    engine = LLMEngine(EngineConfig(model=str(folder), device="cuda", dtype="bfloat16", load_format="dummy",
                                    max_model_len=args.max_model_len, max_num_seqs=max(args.batches),
                                    max_num_batched_tokens=8192, gpu_memory_utilization=args.gpu_mem,
                                    model_id="llama3-8b-shape"))
    build = time.perf_counter() - build
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())
    kv_per_token = mc.kv_bytes_per_token(torch.bfloat16)
    rows = []
    for batch in args.batches:
        step_s = timed_decode_steps(engine, batch, args.prompt_len, args.steps)
        mean_ctx = args.prompt_len + 4 + args.steps / 2
        floor_s = (weight_bytes + batch * mean_ctx * kv_per_token) / bw
        rows.append({"batch": batch, "ferry_ms_step": step_s * 1e3, "floor_ms_step": floor_s * 1e3,
                     "x_floor": step_s / floor_s, "ferry_tok_s": batch / step_s})
    prefill = {f"{b}x{n}": timed_prefill(engine, b, n) for b, n in ((1, 4096), (8, 1024))}
    peak_gpu = torch.cuda.max_memory_allocated() / 2**30
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    hf_rows = {}
    if not args.skip_hf:
        from transformers import AutoConfig, AutoModelForCausalLM
        config = AutoConfig.for_model(**{k: v for k, v in LLAMA3_8B.items() if k != "architectures"})
        with torch.device("cuda"):
            hf = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
        hf.generation_config.eos_token_id = None
        for batch in args.hf_batches:
            hf_rows[batch] = hf_decode_step(hf, mc.vocab_size, batch, args.prompt_len, 32)
        del hf
    for row in rows:
        if row["batch"] in hf_rows:
            row["hf_ms_step"] = hf_rows[row["batch"]] * 1e3
            row["hf_tok_s"] = row["batch"] / hf_rows[row["batch"]]
            row["x_hf"] = row["ferry_tok_s"] / row["hf_tok_s"]
    name = torch.cuda.get_device_name()
    print(f"\nLlama-3-8B shape, bf16, random weights, {name}; prompt {args.prompt_len} tokens, "
          f"{args.steps} timed decode steps; copy bandwidth {bw / 1e12:.2f} TB/s (read+write); "
          f"weights {weight_bytes / 1e9:.2f} GB; engine built in {build:.1f} s")
    print_table(rows, ["batch", "ferry_ms_step", "floor_ms_step", "x_floor", "ferry_tok_s",
                       "hf_ms_step", "hf_tok_s", "x_hf"])
    for k, v in prefill.items():
        print(f"prefill {k} tokens: {v:,.0f} tok/s")
    print(f"peak GPU memory allocated {peak_gpu:.1f} GiB (KV cache included); peak RSS {peak_rss_mb():.0f} MB")
    return {"device": name, "dtype": "bfloat16", "prompt_len": args.prompt_len, "steps": args.steps,
            "copy_bandwidth_bytes_s": bw, "weight_bytes": weight_bytes, "rows": rows,
            "prefill_tok_s": prefill, "peak_gpu_gib": peak_gpu, "peak_rss_mb": peak_rss_mb()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--model", default="models/SmolLM2-135M-Instruct", help="CPU: HF model folder")
    p.add_argument("--dtype", default="float32", help="CPU dtype")
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=None)
    p.add_argument("--hf-batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32])
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=512, help="CUDA: prompt tokens per request")
    p.add_argument("--steps", type=int, default=96, help="CUDA: timed decode steps (three runs)")
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--gpu-mem", type=float, default=0.6, help="CUDA: share of GPU memory for the engine")
    p.add_argument("--skip-hf", action="store_true")
    args = p.parse_args(argv)
    if args.device == "cpu":
        args.batches = args.batches or [1, 8]
        result = bench_cpu(args)
    else:
        if not torch.cuda.is_available():
            print("error: --device cuda needs a CUDA GPU")
            return 2
        args.batches = args.batches or [1, 8, 32, 64]
        result = bench_cuda(args)
    result["command"] = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
