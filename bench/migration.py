"""Live-migration downtime vs recompute, by sequence length, on the real model (Llumnix Fig. 10 style).

    python bench/migration.py --device cpu --json out.json
    python bench/migration.py --device cuda --dtype bfloat16 --model /path/to/8b-shaped-model

Two colocated workers (real processes, real gRPC). For each sequence length L: a prompt of L - 8
tokens (random ids, so no prefix cache helps) is prefilled on worker A — the time of that Prefill
call is what recomputing the KV costs (`recompute_ms`) — it decodes a few tokens there, and is then
live-migrated to worker B while still decoding. The request may generate D = --decode-after more
tokens, so near the context's end L is lowered to fit (`tokens_at_migration` is the length it had
when it moved):

    downtime_ms   suspended on A -> resumed on B (the stop-and-copy stage), as A measures it
    stall_ms      what the client sees: the longest gap between two tokens around the migration,
                  minus the median gap (one decode step)
    stages, MB    pre-copy stages + stop-and-copy, KV bytes moved

Goals (issue 4): downtime(8192) / downtime(256) <= 1.5, and recompute >= 20x downtime at 8192.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.migration_rig import Collected, Rig

SIZES = (256, 512, 1024, 2048, 4096, 8192)
CONTEXT = 8192
STOP_COPY_BLOCKS = 0       # 0: the worker's default; --stop-copy-blocks
DECODE_BEFORE = 8          # tokens decoded on A before the migration starts
DECODE_AFTER = 56          # tokens after it (the request's max_tokens covers both); --decode-after


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma-separated sequence lengths")
    p.add_argument("--decode-after", type=int, default=DECODE_AFTER,
                   help="tokens the request may still generate when the migration starts (enough to outlast "
                        "the pre-copy: raise it where decode is fast, e.g. 400 on a GPU)")
    p.add_argument("--stop-copy-blocks", type=int, default=0,
                   help="stop-and-copy once fewer new full blocks than this are ready (0: worker default, 2; "
                        "1: only the partial block goes in the stop-and-copy)")
    p.add_argument("--repeats", type=int, default=3, help="migrations per size (median reported)")
    p.add_argument("--kv-cache-memory-gb", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads per worker")
    p.add_argument("--dummy-weights", action="store_true",
                   help="random weights from the model folder's config.json alone")
    p.add_argument("--shape", choices=("llama3-8b",), help="a model of this shape with random weights "
                   "(implies --dummy-weights; --model is then ignored)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.4, help="per worker (two share the GPU)")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--logs", help="keep the workers' logs in this folder (default: a temporary one, removed)")
    return p.parse_args(argv)


async def one(rig: Rig, a, b, seq_len: int, vocab: int, rng: random.Random, decode_after: int) -> dict:
    length = min(seq_len, CONTEXT - decode_after)            # the request must fit the context at its end
    prompt = [rng.randrange(100, vocab) for _ in range(length - DECODE_BEFORE)]
    t0 = time.perf_counter()
    rid = await rig.submit(prompt, DECODE_BEFORE + decode_after, a)          # returns after the first token
    recompute = time.perf_counter() - t0
    out = Collected()
    collecting = asyncio.create_task(rig.collect(rid, out))
    while len(out.tokens) < DECODE_BEFORE:
        await asyncio.sleep(0.001)
    reply = await rig.migrate(rid, a, b, stop_copy_blocks=STOP_COPY_BLOCKS)
    tokens_at_migration = len(prompt) + len(out.tokens)
    if not reply.migrated:
        raise RuntimeError(f"migration at {seq_len} tokens failed: {reply.reason}")
    await collecting
    gaps = [t1 - t0 for t0, t1 in zip(out.times, out.times[1:])]
    return {"recompute_s": recompute, "downtime_s": reply.downtime_s, "duration_s": reply.duration_s,
            "stall_s": max(0.0, max(gaps) - statistics.median(gaps)), "step_s": statistics.median(gaps),
            "stages": reply.num_stages, "bytes": reply.num_bytes, "tokens": tokens_at_migration}


async def run(args: argparse.Namespace, rig: Rig, a, b) -> list[dict]:
    config = json.loads((Path(args.model) / "config.json").read_text())
    vocab = config["vocab_size"]
    global CONTEXT, STOP_COPY_BLOCKS
    STOP_COPY_BLOCKS = args.stop_copy_blocks
    CONTEXT = min(8192, config.get("max_position_embeddings", 8192))
    rng = random.Random(0)
    rows = []
    await rig.open()
    try:
        await one(rig, a, b, 256, vocab, rng, args.decode_after)     # warm-up: first calls, allocator, channels
        for seq_len in map(int, args.sizes.split(",")):
            runs = []
            for i in range(args.repeats):
                src, dst = (a, b) if i % 2 == 0 else (b, a)
                runs.append(await one(rig, src, dst, seq_len, vocab, rng, args.decode_after))
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            rows.append({"seq_len": seq_len, "tokens_at_migration": int(med["tokens"]), "downtime_ms": round(med["downtime_s"] * 1e3, 2),
                         "recompute_ms": round(med["recompute_s"] * 1e3, 1),
                         "stall_ms": round(med["stall_s"] * 1e3, 2), "decode_step_ms": round(med["step_s"] * 1e3, 2),
                         "migration_ms": round(med["duration_s"] * 1e3, 1), "stages": med["stages"],
                         "mb_moved": round(med["bytes"] / 2**20, 2),
                         "downtime_all_ms": [round(r["downtime_s"] * 1e3, 2) for r in runs]})
            print_row(rows[-1])
    finally:
        await rig.aclose()
    return rows


def print_row(r: dict) -> None:
    if r["seq_len"] == int(SIZES_SHOWN[0]):
        print(f"{'seq_len':>8} {'downtime ms':>12} {'stall ms':>9} {'step ms':>8} {'recompute ms':>13} "
              f"{'recompute/down':>15} {'stages':>7} {'MB':>7} {'migration ms':>13}")
    print(f"{r['seq_len']:>8} {r['downtime_ms']:>12.2f} {r['stall_ms']:>9.2f} {r['decode_step_ms']:>8.2f} "
          f"{r['recompute_ms']:>13.1f} {r['recompute_ms'] / r['downtime_ms']:>15.1f} {r['stages']:>7g} "
          f"{r['mb_moved']:>7.2f} {r['migration_ms']:>13.1f}", flush=True)


SIZES_SHOWN: list[str] = []


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    SIZES_SHOWN[:] = args.sizes.split(",")
    with tempfile.TemporaryDirectory(prefix="ferry-migration-bench-") as folder:
        if args.shape:
            from bench.engine import LLAMA3_8B
            shaped = Path(folder) / args.shape
            shaped.mkdir()
            (shaped / "config.json").write_text(json.dumps(LLAMA3_8B))
            args.model, args.dummy_weights = str(shaped), True
        folder = args.logs or folder
        Path(folder).mkdir(parents=True, exist_ok=True)
        rig = Rig(Path(folder), Path(args.model), kv_cache_memory_gb=args.kv_cache_memory_gb, threads=args.threads,
                  extra_args=("--device", args.device, "--dtype", args.dtype, "--no-enable-prefix-caching",
                              "--gpu-memory-utilization", str(args.gpu_memory_utilization),
                              *(("--load-format", "dummy") if args.dummy_weights else ())))
        a, b = (rig.launch(name, "decode", args=("--role", "both")) for name in ("worker-a", "worker-b"))
        try:
            rig.wait_ready(a, b)
            rows = asyncio.run(run(args, rig, a, b))
        finally:
            rig.stop_all()
    first, last = rows[0], rows[-1]
    summary = {"downtime_ratio_last_first": round(last["downtime_ms"] / first["downtime_ms"], 2),
               "recompute_over_downtime_last": round(last["recompute_ms"] / last["downtime_ms"], 1),
               "bench_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    print(f"\ndowntime({last['seq_len']}) / downtime({first['seq_len']}) = {summary['downtime_ratio_last_first']}"
          f"  (goal <= 1.5);  recompute / downtime at {last['seq_len']} = {summary['recompute_over_downtime_last']}"
          "  (goal >= 20)")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": args.device, "model": args.model, "dtype": args.dtype,
                                               "rows": rows, "summary": summary}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
