"""Where a CUDA decode step's time goes: GPU time of the captured graph vs the whole engine step,
and the top kernels of one eager decode forward (torch.profiler). Llama-3-8B shape, random weights.

    python bench/profile_decode.py --batch 1 --batch 32
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.engine import LLAMA3_8B
from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.sampling import SamplingParams


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, action="append")
    p.add_argument("--prompt-len", type=int, default=512)
    args = p.parse_args()
    folder = Path(tempfile.mkdtemp())
    (folder / "config.json").write_text(json.dumps(LLAMA3_8B))
    engine = LLMEngine(EngineConfig(model=str(folder), device="cuda", dtype="bfloat16", load_format="dummy",
                                    max_model_len=4096, max_num_seqs=max(args.batch), num_blocks=20000))
    runner = engine.runner
    for batch in args.batch:
        for i in range(batch):
            engine.add_request(f"{batch}-{i}", list(range(1, args.prompt_len + 1)),
                               SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
        for _ in range(10):
            engine.step()
        graph, _ = runner.graphs[min(b for b in runner.graphs if b >= batch)]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            graph.replay()
        end.record()
        end.synchronize()
        replay_ms = start.elapsed_time(end) / 50
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(50):
            engine.step()
        torch.cuda.synchronize()
        step_ms = (time.perf_counter() - t) / 50 * 1e3
        sched = engine.scheduler
        t = time.perf_counter()
        for _ in range(50):
            out = sched.schedule()
            for c in out.chunks:        # undo the allocation side effects are none for decodes in place
                pass
        sched_ms = (time.perf_counter() - t) / 50 * 1e3
        print(f"batch {batch}: graph replay {replay_ms:.2f} ms (GPU), engine.step {step_ms:.2f} ms (wall), "
              f"schedule() {sched_ms:.2f} ms")
        phases = {"schedule": 0.0, "prepare+replay": 0.0, "sample (waits for GPU)": 0.0, "postprocess": 0.0}
        from services.engine.sampling import sample
        for _ in range(50):
            t0 = time.perf_counter()
            out = engine.scheduler.schedule()
            t1 = time.perf_counter()
            logits = runner.run(out)
            t2 = time.perf_counter()
            seqs = [c.seq for c in out.chunks if c.samples]
            tokens = sample(logits, [s.params for s in seqs], [s.seed for s in seqs],
                            [s.num_output_tokens for s in seqs])
            t3 = time.perf_counter()
            engine.scheduler.postprocess(out, tokens)
            [engine._after_sample(c.seq) for c in out.chunks if c.samples]
            t4 = time.perf_counter()
            for k, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                phases[k] += dt * 1e3 / 50
        print("  per step: " + ", ".join(f"{k} {v:.3f} ms" for k, v in phases.items()))
        prof_cpu = cProfile.Profile()
        prof_cpu.enable()
        for _ in range(50):
            engine.step()
        prof_cpu.disable()
        pstats.Stats(prof_cpu).sort_stats("tottime").print_stats(12)
        saved = runner.graphs
        runner.graphs = {}
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            engine.step()
            torch.cuda.synchronize()
        runner.graphs = saved
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
        for i in range(batch):
            engine.abort(f"{batch}-{i}")


if __name__ == "__main__":
    main()
