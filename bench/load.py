"""Load benchmark: 1,000 concurrent streams through one gateway, and what the gateway and scheduler add.

    .venv/bin/python bench/load.py --json bench/out/load.json           # ~2 min on 2 cores
    .venv/bin/python bench/load.py --concurrency 200 --workers 1       # quicker

One `ferry up --engine sim` stack (prefill and decode workers run the sim engine) serves two
profiles' worth of questions, back to back in one process:

- **overhead**: a profile whose steps take no time (`null` below), so every millisecond the client
  measures is Ferry's own: the gateway (HTTP, tokenization, SSE), the scheduler's Route, the workers'
  gRPC hand-offs and token pushes. Run at concurrency 1 (the baseline) and then at `--concurrency`; the
  ratio is the overhead's growth under load.
- **realistic**: the Llama-3-8B/H100 sim profile at `--concurrency`: the same 1,000 streams, paced like
  GPUs would pace them.

Each run reports completed/failed requests, client-side TTFT and inter-chunk latency (p50/p99), the
scheduler's own Route time (server side, from its Prometheus histogram: the increase over the run),
and the gateway's and scheduler's RSS at start and at peak (they must stay flat under load). Prints a
table and writes JSON. Absolute times are this machine's (CPU-bound: client, gateway, scheduler and
workers share its cores); compare the ratios.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))                   # run as a script: `bench` and `services` importable

from bench.serving import MemorySampler, children, free_port

MODEL = "SmolLM2-135M-Instruct"
NULL_PROFILE = """\
name: null
num_params: 1.0e6
num_layers: 1
hidden_size: 64
kv_bytes_per_token: 256
flops: 1.0e20
memory_bandwidth: 1.0e20
step_overhead_s: 0.0
vocab_size: 49152
max_model_len: 4096
"""
PROMPT = "Tell me about the sea. " * 12          # ~60 tokens
STREAM_TIMEOUT_S = 300.0


@dataclass
class Stream:
    ok: bool
    ttft_s: float = 0.0
    gaps_s: list[float] = field(default_factory=list)
    e2e_s: float = 0.0              # send to last token
    error: str = ""


async def sse_events(host: str, port: int, path: str, body: bytes):
    """POST `body` and yield the server-sent events' data (a minimal HTTP/1.1 client: the benchmark's own
    CPU must not be what it measures — httpx spent as much CPU as the gateway at 1,000 streams)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n%s" % (path.encode(), host.encode(), len(body), body))
        status = await reader.readline()
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            key, _, value = line.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip()
        if not status.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"{status.decode().strip()}: {(await reader.read(300))!r}")
        buffer = b""
        while True:
            if headers.get("transfer-encoding") == "chunked":
                size = int((await reader.readline()).split(b";")[0], 16)
                if size == 0:
                    return
                chunk = await reader.readexactly(size + 2)
                buffer += chunk[:-2]
            else:
                chunk = await reader.read(65536)
                if not chunk:
                    return
                buffer += chunk
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                if event.startswith(b"data: "):
                    yield event[6:]
    finally:
        writer.close()


async def one_stream(host: str, port: int, max_tokens: int) -> Stream:
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "stream": True,
                       "ignore_eos": True}).encode()
    start = time.perf_counter()
    stamps: list[float] = []
    finish = None
    try:
        async for data in sse_events(host, port, "/v1/completions", body):
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                return Stream(False, error=str(event["error"])[:200])
            choice = event["choices"][0]
            if choice.get("text"):
                stamps.append(time.perf_counter())
            finish = choice.get("finish_reason") or finish
    except (OSError, RuntimeError, ValueError, asyncio.IncompleteReadError) as e:
        return Stream(False, error=f"{type(e).__name__}: {e}")
    if finish != "length" or not stamps:
        return Stream(False, error=f"finish_reason {finish!r} after {len(stamps)} chunks")
    return Stream(True, stamps[0] - start, [b - a for a, b in itertools.pairwise(stamps)],
                  stamps[-1] - start)


async def run_streams(base_url: str, concurrency: int, total: int, max_tokens: int) -> tuple[list[Stream], float]:
    """`total` streams, `concurrency` at a time (all at once when equal); returns them and the wall time."""
    url = urllib.parse.urlsplit(base_url)
    gate = asyncio.Semaphore(concurrency)

    async def gated() -> Stream:
        async with gate:
            return await asyncio.wait_for(one_stream(url.hostname, url.port, max_tokens), STREAM_TIMEOUT_S)

    start = time.perf_counter()
    streams = await asyncio.gather(*(gated() for _ in range(total)), return_exceptions=True)
    streams = [s if isinstance(s, Stream) else Stream(False, error=f"{type(s).__name__}: {s}") for s in streams]
    return streams, time.perf_counter() - start


def route_histogram(metrics_port: int) -> tuple[dict[float, float], float]:
    """The scheduler's Route duration histogram: cumulative bucket counts by upper bound, and the count."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    buckets = {}
    for m in re.finditer(r'^ferry_scheduler_route_duration_seconds_bucket\{[^}]*le="([^"]+)"[^}]*\} (\S+)$', text, re.MULTILINE):
        buckets[float(m.group(1))] = buckets.get(float(m.group(1)), 0.0) + float(m.group(2))
    return buckets, buckets.get(float("inf"), 0.0)


def histogram_quantile(q: float, before: dict[float, float], after: dict[float, float]) -> float:
    """Prometheus' histogram_quantile over the increase between two scrapes (linear within a bucket)."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    if total <= 0:
        return float("nan")
    rank, lower, below = q * total, 0.0, 0.0
    for bound, cumulative in zip(bounds, counts):
        if cumulative >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / max(cumulative - below, 1e-12)
        lower, below = bound, cumulative
    return lower


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def summarize(name: str, streams: list[Stream], wall_s: float, route: tuple[dict, dict]) -> dict:
    ok = [s for s in streams if s.ok]
    ttft = [s.ttft_s * 1e3 for s in ok]
    gaps = [g * 1e3 for s in ok for g in s.gaps_s]
    e2e = [s.e2e_s * 1e3 for s in ok]
    return {"run": name, "requests": len(streams), "completed": len(ok), "failed": len(streams) - len(ok),
            "errors": sorted({s.error for s in streams if not s.ok})[:5], "wall_s": round(wall_s, 2),
            "median_ttft_ms": statistics.median(ttft) if ttft else float("nan"), "p99_ttft_ms": pct(ttft, 0.99),
            "median_itl_ms": statistics.median(gaps) if gaps else float("nan"), "p99_itl_ms": pct(gaps, 0.99),
            "median_e2e_ms": statistics.median(e2e) if e2e else float("nan"), "p99_e2e_ms": pct(e2e, 0.99),
            "route_p50_ms": histogram_quantile(0.5, *route) * 1e3, "route_p99_ms": histogram_quantile(0.99, *route) * 1e3}


@dataclass
class Stack:
    proc: subprocess.Popen
    url: str
    metrics_port: int
    pids: dict[int, str]


def start_stack(profile: Path, workers: int, log_dir: Path, max_num_seqs: int) -> Stack:
    port, metrics_port = free_port(), free_port()
    argv = [sys.executable, "-m", "services.cli", "up", "--engine", "sim", "--sim-profile", str(profile),
            "--sim-num-blocks", "16384", "--prefill", str(workers), "--decode", str(workers),
            "--max-num-seqs", str(max_num_seqs), "--port", str(port), "--log-dir", str(log_dir),
            "--scheduler-arg", f"metrics-port={metrics_port}"]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True)
    for line in proc.stdout:
        if "Press Ctrl-C" in line:
            break
    else:
        raise RuntimeError(f"ferry up exited with {proc.wait()}; logs in {log_dir}")
    return Stack(proc, f"http://127.0.0.1:{port}", metrics_port, children(proc.pid))


def stop_stack(stack: Stack) -> list[int]:
    """Ctrl-C, then the pids still alive (none expected)."""
    stack.proc.send_signal(signal.SIGINT)
    try:
        stack.proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(stack.proc.pid, signal.SIGKILL)
        stack.proc.wait()
    return [pid for pid in stack.pids if Path(f"/proc/{pid}").exists()]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(stack: Stack, name: str, concurrency: int, total: int, max_tokens: int) -> dict:
    before, _ = route_histogram(stack.metrics_port)
    cpu_before = {pid: cpu_seconds(pid) for pid in stack.pids}
    client_before = time.process_time()
    streams, wall = asyncio.run(run_streams(stack.url, concurrency, total, max_tokens))
    after, _ = route_histogram(stack.metrics_port)
    result = summarize(name, streams, wall, (before, after))
    result["concurrency"] = concurrency
    cpu = {"client (this benchmark)": time.process_time() - client_before}
    for pid, label in stack.pids.items():
        service = label.rsplit("-", 1)[0]
        cpu[service] = cpu.get(service, 0.0) + cpu_seconds(pid) - cpu_before[pid]
    result["cpu_s"] = {k: round(v, 2) for k, v in cpu.items()}
    return result


def run_profile(label: str, profile: Path, args: argparse.Namespace, work: Path, runs: list[tuple[str, int, int]]) -> dict:
    stack = start_stack(profile, args.workers, work / f"logs-{label}",
                        max_num_seqs=max(64, args.concurrency // args.workers + 8))
    sampler = MemorySampler(stack.pids)
    sampler.start()
    try:
        results = [measure(stack, f"{label} c={c}", c, n, args.max_tokens) for _, c, n in runs]
    finally:
        sampler.done.set()
        sampler.join()
        left = stop_stack(stack)
    memory = {name.rsplit("-", 1)[0]: {"start_mb": round(sampler.first[name], 1), "peak_mb": round(sampler.peak[name], 1)}
              for name in sampler.first if name.split("-")[0] in ("gateway", "scheduler")}
    return {"runs": results, "memory": memory, "processes_left_after_stop": left}


def table(report: dict) -> str:
    cols = [("run", "run"), ("completed", "ok"), ("failed", "failed"), ("wall_s", "wall s"),
            ("median_ttft_ms", "TTFT p50"), ("p99_ttft_ms", "TTFT p99"), ("median_itl_ms", "ITL p50"),
            ("p99_itl_ms", "ITL p99"), ("median_e2e_ms", "E2E p50"), ("p99_e2e_ms", "E2E p99"), ("route_p50_ms", "Route p50"), ("route_p99_ms", "Route p99")]
    lines = [" | ".join(h for _, h in cols), " | ".join("---" for _ in cols)]
    for part in report["profiles"].values():
        for r in part["runs"]:
            lines.append(" | ".join(f"{r[k]:.1f}" if isinstance(r[k], float) else str(r[k]) for k, _ in cols))
    lines.append("")
    for part in report["profiles"].values():
        for r in part["runs"]:
            per_request = {k.split()[0]: v * 1e3 / r["requests"] for k, v in r["cpu_s"].items() if v > 0}
            lines.append(f"{r['run']}: CPU ms per request: " + ", ".join(f"{k} {v:.1f}" for k, v in per_request.items()))
    for label, part in report["profiles"].items():
        for name, m in part["memory"].items():
            lines.append(f"{label}: {name} RSS {m['start_mb']:.0f} MB at start, {m['peak_mb']:.0f} MB at peak")
    overhead = report["profiles"].get("overhead", {}).get("runs", [])
    if len(overhead) == 2:
        base, loaded = overhead
        lines.append(f"overhead growth at c={loaded['concurrency']} vs c=1: TTFT p50 "
                     f"{loaded['median_ttft_ms'] / base['median_ttft_ms']:.1f}x, E2E p50 "
                     f"{loaded['median_e2e_ms'] / base['median_e2e_ms']:.1f}x, Route p99 "
                     f"{loaded['route_p99_ms'] / base['route_p99_ms']:.1f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--concurrency", type=int, default=1000)
    p.add_argument("--workers", type=int, default=2, help="prefill and decode workers each")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--baseline-requests", type=int, default=20, help="sequential requests of the c=1 baseline")
    p.add_argument("--skip-realistic", action="store_true")
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "load.json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ferry-load-") as tmp:
        work = Path(tmp)
        null = work / "null.yaml"
        null.write_text(NULL_PROFILE)
        profiles = {"overhead": run_profile("overhead", null, args, work, [
            ("baseline", 1, args.baseline_requests), ("load", args.concurrency, args.concurrency)])}
        if not args.skip_realistic:
            profiles["realistic"] = run_profile("llama3-8b-h100", Path("llama3-8b-h100"), args, work, [
                ("load", args.concurrency, args.concurrency)])
    report = {"concurrency": args.concurrency, "workers": args.workers, "max_tokens": args.max_tokens,
              "cpu_count": os.cpu_count(), "profiles": profiles}
    print(table(report))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=asdict))
    print(f"\nwrote {args.json}")
    failed = sum(r["failed"] for part in profiles.values() for r in part["runs"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
