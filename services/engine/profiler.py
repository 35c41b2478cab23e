"""`ferry profile`: time the real engine's steps and fit the `SimProfile` that the sim engine runs on.

    measure  prefill steps (one request, several prompt lengths) and decode steps (batch x context),
             each through `LLMEngine.step()` itself, several repetitions, median per point
    fit      flops, memory_bandwidth, step_overhead_s so that SimProfile.step_seconds matches them
             (least squares on relative error; `fit_profile` is pure and knows nothing of the engine)
    write    the profile YAML, with a header saying when, what and how, and how well the fit holds

Decode contexts are built by `import_kv` of zero-filled KV (the engine's migration path), not by
prefilling: a 32 x 512 batch would otherwise spend minutes of CPU prefill before the first timed step.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from services.engine.sim_profile import SimProfile
from services.engine.step_scheduler import ScheduledChunk, SchedulerOutput

Chunks = tuple[tuple[int, int], ...]      # (start, num_tokens) of each chunk of one step


@dataclass(frozen=True, slots=True)
class StepPoint:
    """One measured step shape and its median wall time."""
    label: str            # "prefill 512" | "decode 8x128"
    chunks: Chunks
    seconds: float


@dataclass(frozen=True, slots=True)
class Plan:
    """What to measure: prompt lengths, decode batches x contexts, and repetitions of each."""
    prefill_lens: tuple[int, ...] = (32, 64, 128, 256, 512, 1024)
    decode_batches: tuple[int, ...] = (1, 4, 16, 32)
    decode_contexts: tuple[int, ...] = (128, 512)
    repeats: int = 5


QUICK = Plan(prefill_lens=(32, 128, 512), decode_batches=(1, 8, 32), decode_contexts=(128, 512), repeats=3)


# ---- the model's side: constants and the work of a step ----------------------------------------
def model_constants(model_config, dtype_bytes: int, name: str) -> SimProfile:
    """A profile with the model's constants from its config.json (rates left at placeholders)."""
    mc = model_config
    attention = mc.hidden_size * mc.head_dim * (2 * mc.num_heads + 2 * mc.num_kv_heads)
    layer = attention + 3 * mc.hidden_size * mc.intermediate_size + 2 * mc.hidden_size
    embeddings = mc.vocab_size * mc.hidden_size * (1 if mc.tie_word_embeddings else 2)
    num_params = mc.num_layers * layer + embeddings + mc.hidden_size
    max_len = min(mc.max_position_embeddings, mc.sliding_window or 1 << 30)
    kv_bytes = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * dtype_bytes
    return SimProfile(name=name, num_params=float(num_params), num_layers=mc.num_layers,
                      hidden_size=mc.hidden_size, kv_bytes_per_token=kv_bytes, flops=1.0, memory_bandwidth=1.0,
                      weight_bytes=float(num_params * dtype_bytes), vocab_size=mc.vocab_size, max_model_len=max_len)


def _step(chunks: Chunks) -> SchedulerOutput:
    # step_seconds reads only each chunk's start and length, so no Sequence is needed.
    return SchedulerOutput(tuple(ScheduledChunk(None, start, num, True) for start, num in chunks))  # type: ignore[arg-type]


def step_work(constants: SimProfile, chunks: Chunks) -> tuple[float, float]:
    """(FLOPs, bytes) of a step, read off SimProfile's own formula by pricing one side at 1/s and the
    other as free, so the fit can never drift from the model it fits."""
    step = _step(chunks)
    flop = replace(constants, flops=1.0, memory_bandwidth=1e300, step_overhead_s=0.0).step_seconds(step)
    mem = replace(constants, flops=1e300, memory_bandwidth=1.0, step_overhead_s=0.0).step_seconds(step)
    return flop, mem


def modeled_seconds(profile: SimProfile, chunks: Chunks) -> float:
    return profile.step_seconds(_step(chunks))


# ---- the fit (pure) ---------------------------------------------------------------------------
def fit_profile(constants: SimProfile, points: list[StepPoint]) -> SimProfile:
    """flops, memory_bandwidth, step_overhead_s minimizing the squared relative error of
    overhead + max(flop/flops, bytes/bandwidth) over the points.

    Which term wins a point depends only on its intensity flop/bytes against flops/bandwidth, so the
    regimes are a split of the points sorted by intensity: each of the n+1 splits is a linear least
    squares in (overhead, 1/flops, 1/bandwidth); the best under the true (max) objective is kept and
    refined by a short coordinate search."""
    if len(points) < 3:
        raise ValueError(f"{len(points)} points: the fit needs at least 3")
    work = np.array([step_work(constants, p.chunks) for p in points])
    y = np.array([p.seconds for p in points])
    order = np.argsort(work[:, 0] / work[:, 1])
    best = None
    for split in range(len(points) + 1):
        compute_bound = np.zeros(len(points), bool)
        compute_bound[order[split:]] = True
        params = _solve_split(work, y, compute_bound)
        if params is not None and (best is None or _loss(params, work, y) < _loss(best, work, y)):
            best = params
    if best is None:
        raise ValueError("no fit with positive rates: are the measured times increasing with work?")
    best = _refine(best, work, y)
    overhead, inv_flops, inv_bw = best
    return replace(constants, flops=1 / inv_flops, memory_bandwidth=1 / inv_bw, step_overhead_s=overhead)


def _solve_split(work: np.ndarray, y: np.ndarray, compute_bound: np.ndarray) -> np.ndarray | None:
    """(overhead, 1/flops, 1/bandwidth) by weighted least squares for one regime assignment."""
    design = np.column_stack([np.ones_like(y), work[:, 0] * compute_bound, work[:, 1] * ~compute_bound]) / y[:, None]
    for columns in ([0, 1, 2], [1, 2]):          # with an overhead; without, if it came out negative
        used = [c for c in columns if design[:, c].any()]
        solution = np.zeros(3)
        solution[used] = np.linalg.lstsq(design[:, used], np.ones_like(y), rcond=None)[0]
        if solution[0] >= 0:
            break
    if solution[1] < 0 or solution[2] < 0 or (solution[1] == 0 and solution[2] == 0):
        return None
    # A regime with no points leaves its rate free: take the slowest rate that keeps every point on the
    # other side (the data cannot tell it apart from any faster one).
    if solution[1] == 0:
        solution[1] = solution[2] * np.min(work[:, 1] / work[:, 0])
    if solution[2] == 0:
        solution[2] = solution[1] * np.min(work[:, 0] / work[:, 1])
    return solution


def _loss(params: np.ndarray, work: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum((_predict(params, work) / y - 1) ** 2))


def _predict(params: np.ndarray, work: np.ndarray) -> np.ndarray:
    overhead, inv_flops, inv_bw = params
    return overhead + np.maximum(work[:, 0] * inv_flops, work[:, 1] * inv_bw)


def _refine(params: np.ndarray, work: np.ndarray, y: np.ndarray, rounds: int = 60) -> np.ndarray:
    """Coordinate search: scale each parameter up/down by a factor that halves when nothing improves."""
    params, factor = params.copy(), 1.2
    floor = 1e-3 * float(np.min(y))       # lets a zero overhead move
    for _ in range(rounds):
        improved = False
        for i in range(3):
            for trial in (params[i] * factor, params[i] / factor, params[i] + floor * (factor - 1)):
                candidate = params.copy()
                candidate[i] = trial
                if _loss(candidate, work, y) < _loss(params, work, y):
                    params, improved = candidate, True
        if not improved:
            factor = 1 + (factor - 1) / 2
    return params


def relative_errors(profile: SimProfile, points: list[StepPoint]) -> list[float]:
    return [modeled_seconds(profile, p.chunks) / p.seconds - 1 for p in points]


# ---- measurement (the real engine) ------------------------------------------------------------
def measure(engine, plan: Plan, log=print) -> list[StepPoint]:
    """Median step times of the plan's prefill and decode points, timed around `engine.step()`."""
    engine.generate([[1, 2, 3, 4] * 8], _params(4))              # warm-up: first-call costs
    points = []
    for n in plan.prefill_lens:
        points.append(_measure_prefill(engine, n, plan.repeats))
        log(f"  {points[-1].label:>16}: {points[-1].seconds * 1e3:9.2f} ms")
    for context in plan.decode_contexts:
        for batch in plan.decode_batches:
            points.append(_measure_decode(engine, batch, context, plan.repeats))
            log(f"  {points[-1].label:>16}: {points[-1].seconds * 1e3:9.2f} ms")
    return points


def _params(max_tokens: int):
    from services.engine.sampling import SamplingParams
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


def _timed_step(engine) -> float:
    import torch
    is_cuda = engine.runner.device.type == "cuda"
    if is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    engine.step()
    if is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _measure_prefill(engine, num_tokens: int, repeats: int) -> StepPoint:
    """One request's whole prompt in one step (max_tokens 1, so it ends there); fresh random tokens each
    time, so the prefix cache never hits. The first repetition is a warm-up."""
    rng = np.random.default_rng(num_tokens)
    times = []
    for r in range(repeats + 1):
        rid = f"profile-prefill-{num_tokens}-{r}"
        engine.add_request(rid, rng.integers(0, engine.vocab_size, num_tokens).tolist(), _params(1))
        times.append(_timed_step(engine))
        if rid in engine.seqs:
            raise RuntimeError(f"prefill of {num_tokens} tokens took more than one step: raise the token budget")
    return StepPoint(f"prefill {num_tokens}", ((0, num_tokens),), statistics.median(times[1:]))


def _measure_decode(engine, batch: int, context: int, repeats: int) -> StepPoint:
    """`batch` requests that each hold `context` tokens of KV, decoding together; the first step is a
    warm-up, the point's shape is that of the middle timed step."""
    from services.engine.kv_transfer import KVPayload

    rng = np.random.default_rng(batch * 100_003 + context)
    num_blocks = -(-context // engine.layout.block_size)
    ids = [f"profile-decode-{batch}x{context}-{i}" for i in range(batch)]
    for rid in ids:
        tokens = tuple(rng.integers(0, engine.vocab_size, context + 1).tolist())
        engine.import_kv(KVPayload(engine.layout, rid, tokens, context, context, _params(repeats + 4), 0, 0,
                                   num_blocks, (), bytes(num_blocks * engine.layout.bytes_per_block)))
    times, shapes = [], []
    for _ in range(repeats + 1):
        running = engine.scheduler.running
        if len(running) != batch or engine.scheduler.waiting:
            raise RuntimeError(f"decode {batch}x{context}: {len(running)} of {batch} requests running; "
                               "the engine needs more KV blocks or max_num_seqs")
        shapes.append(tuple((s.num_computed_tokens, s.num_tokens - s.num_computed_tokens) for s in running))
        times.append(_timed_step(engine))
    for rid in ids:
        engine.abort(rid)
    return StepPoint(f"decode {batch}x{context}", shapes[1 + repeats // 2], statistics.median(times[1:]))


# ---- output -----------------------------------------------------------------------------------
def render_yaml(profile: SimProfile, header: list[str]) -> str:
    lines = [f"# {h}" for h in header] + [f"name: {profile.name}"]
    for key in ("num_params", "num_layers", "hidden_size", "kv_bytes_per_token", "weight_bytes", "flops",
                "memory_bandwidth", "step_overhead_s", "vocab_size", "max_model_len"):
        value = getattr(profile, key)
        lines.append(f"{key}: {value:.4e}" if isinstance(value, float) else f"{key}: {value}")
    return "\n".join(lines) + "\n"


def table(profile: SimProfile, points: list[StepPoint]) -> str:
    rows = [f"{'point':>16}  {'measured ms':>11}  {'modeled ms':>10}  {'error':>7}"]
    for p, err in zip(points, relative_errors(profile, points)):
        rows.append(f"{p.label:>16}  {p.seconds * 1e3:11.2f}  {modeled_seconds(profile, p.chunks) * 1e3:10.2f}  "
                    f"{err:+7.1%}")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ferry profile", description="Measure the real engine's step times and "
                                "write the SimProfile YAML that the sim engine runs on.")
    p.add_argument("--model", default="models/SmolLM2-135M-Instruct", help="HF-format model folder")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", type=Path, required=True, help="profile YAML to write")
    p.add_argument("--name", help="profile name (default: the --out file's stem)")
    p.add_argument("--quick", action="store_true", help="fewer points and repetitions (tests, smoke runs)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from services.engine.config import EngineConfig, ModelConfig
    from services.engine.engine import LLMEngine

    plan = QUICK if args.quick else Plan()
    name = args.name or args.out.stem
    try:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: this machine has no CUDA GPU; use --device cpu")
        model_config = ModelConfig.from_folder(args.model)
        constants = model_constants(model_config, torch.empty(0, dtype=getattr(torch, args.dtype)).element_size(),
                                    name)
        max_len = max(plan.decode_contexts) + plan.repeats + 8
        num_blocks = max(plan.decode_batches) * -(-max_len // 16) + -(-max(plan.prefill_lens) // 16) + 16
        config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype, num_blocks=num_blocks,
                              max_num_seqs=max(64, *plan.decode_batches),
                              max_num_batched_tokens=max(2048, *plan.prefill_lens))
        started = time.perf_counter()
        engine = LLMEngine(config)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}")
        return 2
    print(f"profiling {args.model} on {args.device} ({args.dtype}); {len(plan.prefill_lens)} prefill and "
          f"{len(plan.decode_batches) * len(plan.decode_contexts)} decode points, median of {plan.repeats}")
    points = measure(engine, plan)
    profile = fit_profile(constants, points)
    errors = [abs(e) for e in relative_errors(profile, points)]
    print(table(profile, points))
    summary = f"relative error max {max(errors):.1%}, median {statistics.median(errors):.1%} over {len(points)} points"
    print(f"fit: flops {profile.flops:.3e}/s, memory_bandwidth {profile.memory_bandwidth:.3e} B/s, "
          f"step_overhead {profile.step_overhead_s * 1e3:.2f} ms; {summary}; {time.perf_counter() - started:.0f} s")
    header = _header(args, plan, engine, summary)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render_yaml(profile, header))
    SimProfile.load(args.out)                     # what the sim engine will read must load
    print(f"wrote {args.out}")
    return 0


def _header(args, plan: Plan, engine, summary: str) -> list[str]:
    import torch
    if args.device.startswith("cuda"):
        hardware = torch.cuda.get_device_name(torch.device(args.device))
    else:
        hardware = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return [f"{Path(args.model).name}, {args.dtype}, {hardware}; torch {torch.__version__}.",
            f"Measured {when} by: ferry profile {' '.join(sys.argv[2:]) or '(in-process)'}",
            (f"Points: prefill of one request at {', '.join(map(str, plan.prefill_lens))} tokens; decode at "
             f"batch {'/'.join(map(str, plan.decode_batches))} x context {'/'.join(map(str, plan.decode_contexts))};"),
            (f"median of {plan.repeats} LLMEngine.step() calls each (after one warm-up). Fit of "
             "step = overhead + max(compute, memory)"),
            f"(least squares on relative error): {summary}."]


if __name__ == "__main__":
    raise SystemExit(main())
