"""Serving benchmark: `ferry bench` against `ferry up`, disaggregated and colocated, back to back.

    .venv/bin/python bench/serving.py --json bench/out/serving.json          # (make bench)
    .venv/bin/python bench/serving.py --num-prompts 20 --modes disaggregated  # quicker

Each mode starts the whole stack (`ferry up`, same machine, same model, same CPU cores shared out),
replays the same scaled Azure conversation trace with `ferry bench`, samples the resident memory of
every process of the stack, then stops it (SIGINT) and checks nothing is left. Prints the vLLM-style
table of each mode, one comparison table, and writes everything as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT.parent / "shared" / "data" / "traces" / "azure_llm_2023_conv.csv"
MODES = {"disaggregated": [], "colocated": ["--colocated"]}
ROWS = [("completed", "Successful requests"), ("failed", "Failed requests"),
        ("request_throughput", "Request throughput (req/s)"), ("output_throughput", "Output tok/s"),
        ("median_ttft_ms", "Median TTFT (ms)"), ("p99_ttft_ms", "P99 TTFT (ms)"),
        ("median_tpot_ms", "Median TPOT (ms)"), ("p99_tpot_ms", "P99 TPOT (ms)"),
        ("median_itl_ms", "Median ITL (ms)"), ("median_e2el_ms", "Median E2E (ms)"),
        ("request_goodput", "Goodput (req/s)"), ("slo_attainment_pct", "Within SLO (%)")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> dict[int, str]:
    """Direct children of `pid`: pid -> the service name (from its command line)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            words = [w.decode(errors="replace") for w in cmd if w]
            name = words[words.index("serve") + 1] if "serve" in words else Path(words[0]).name
            if "--role" in words:
                name = words[words.index("--role") + 1]
            out[int(entry.name)] = f"{name}-{entry.name}"
    return out


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class MemorySampler(threading.Thread):
    """RSS of each process every 0.5 s: first sample (after start-up) and peak."""

    def __init__(self, pids: dict[int, str]) -> None:
        super().__init__(daemon=True)
        self.pids, self.first, self.peak = pids, {}, {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for pid, name in self.pids.items():
                mb = rss_mb(pid)
                if mb:
                    self.first.setdefault(name, mb)
                    self.peak[name] = max(self.peak.get(name, 0.0), mb)
            self.done.wait(0.5)


def run_mode(mode: str, args: argparse.Namespace, out_dir: Path) -> dict:
    port = free_port()
    log_dir = out_dir / f"logs-{mode}"
    up = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--port", str(port), "--log-dir",
                           str(log_dir), *MODES[mode]], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 300
        for line in up.stdout:
            if "Press Ctrl-C" in line:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{mode}: the stack did not start; see {log_dir}")
        else:
            raise RuntimeError(f"{mode}: ferry up exited with {up.wait()}; see {log_dir}")
        pids = children(up.pid)
        sampler = MemorySampler(pids)
        sampler.start()
        result_path = out_dir / f"serving-{mode}.json"
        bench = [sys.executable, "-m", "services.cli", "bench", "--base-url", f"http://127.0.0.1:{port}",
                 "--trace", str(args.trace), "--num-prompts", str(args.num_prompts),
                 "--trace-time-scale", str(args.trace_time_scale), "--length-scale", str(args.length_scale),
                 "--max-input-len", str(args.max_input_len), "--max-output-len", str(args.max_output_len),
                 "--slo", args.slo, "--label", mode, "--json", str(result_path), "--disable-tqdm"]
        print(f"\n### {mode}: {' '.join(bench[2:])}", flush=True)
        subprocess.run(bench, cwd=ROOT, check=True)
        sampler.done.set()
        sampler.join()
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(60)
    left = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
    result = json.loads(result_path.read_text())
    result["memory_mb"] = {"first": sampler.first, "peak": sampler.peak}
    result["processes_left_after_stop"] = left
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--modes", default="disaggregated,colocated")
    p.add_argument("--trace", type=Path, default=TRACE)
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--trace-time-scale", type=float, default=4.0, help="4 = a quarter of the trace's rate")
    p.add_argument("--length-scale", type=float, default=0.25, help="multiply input and output lengths")
    p.add_argument("--max-input-len", type=int, default=2048)
    p.add_argument("--max-output-len", type=int, default=256)
    p.add_argument("--slo", default="ttft:2000,tpot:100")
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "serving.json")
    args = p.parse_args()
    if not args.trace.is_file():
        print(f"trace {args.trace} not found (it lives in ../shared/data/traces/)", file=sys.stderr)
        return 1
    args.json.parent.mkdir(parents=True, exist_ok=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="ferry-bench-") as tmp:
        for mode in args.modes.split(","):
            results[mode] = run_mode(mode, args, Path(tmp))
    print(f"\n{'':30}" + "".join(f"{m:>16}" for m in results))
    for key, label in ROWS:
        cells = []
        for r in results.values():
            v = r["summary"].get(key)
            cells.append(f"{v:>16.2f}" if isinstance(v, float) else f"{v!s:>16}")
        print(f"{label:30}" + "".join(cells))
    for mode, r in results.items():
        peak = ", ".join(f"{k} {v:.0f}" for k, v in sorted(r["memory_mb"]["peak"].items()))
        print(f"peak RSS MB ({mode}): {peak}; processes left after stop: {r['processes_left_after_stop']}")
    args.json.write_text(json.dumps({"settings": vars(args) | {"trace": str(args.trace), "json": str(args.json)},
                                     "results": results}, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
