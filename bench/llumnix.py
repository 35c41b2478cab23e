"""Llumnix-style comparison on the local stack: round-robin vs load-aware (no migration) vs Ferry (with
live migration), sim-engine decode workers, the Azure conversation trace.

    .venv/bin/python bench/llumnix.py --json bench/out/llumnix.json
    .venv/bin/python bench/llumnix.py --configs ferry --num-prompts 40      # one quick configuration

For each configuration this starts `ferry up --engine sim --prefill P --decode D --sim-num-blocks N`
with the scheduler's routing preset and live migration set through `--scheduler-arg`, replays the same
trace window with `ferry bench` (same requests, seed and arrival times for every configuration), then:

    preemptions   WorkerLoad.num_preemptions of every decode worker (scheduler ListInstances, at the end)
    migrations    ferry_scheduler_migrations_total{reason, outcome} from the scheduler's /metrics
    KV usage      every decode worker's used blocks, polled twice a second during the run: the mean
                  spread between the fullest and the emptiest worker, and the mean and peak usage
    peak RSS      of every process of the stack (bench/serving.py's sampler)

and stops the stack. Prints one table; --json writes settings and every result.

    round_robin   routing preset round_robin (no scorers), migration off
    load_aware    routing preset load_aware (Llumnix freeness only), migration off
    ferry         routing preset ferry (prefix affinity, predicted TTFT, freeness, queue), migration on
    ferry_no_migration   (not in the default set) the ferry preset without migration: the ablation

The sim engine paces every step in real time by its performance profile (default bench/profiles/llama2-7b-a10.yaml), so
on a 2-core machine the stack's own CPU time (gateway, token streaming, the bench client) adds to the
latencies: read the ratios between configurations run back to back, not the absolute milliseconds.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.serving import TRACE, MemorySampler, children, free_port

PROFILE = ROOT / "bench" / "profiles" / "llama2-7b-a10.yaml"     # Llumnix's setting: LLaMA-7B on an A10
CONFIGS: dict[str, dict[str, str]] = {
    "round_robin": {"routing-config": "round_robin", "migration-interval-s": "0"},
    "load_aware": {"routing-config": "load_aware", "migration-interval-s": "0"},
    "ferry": {"routing-config": "ferry"},                 # + migration-interval-s from --migration-interval-s
    "ferry_no_migration": {"routing-config": "ferry", "migration-interval-s": "0"},
}
DEFAULT_CONFIGS = "round_robin,load_aware,ferry"
ROWS = [("completed", "Successful requests", "{:d}"), ("failed", "Failed requests", "{:d}"),
        ("median_ttft_ms", "P50 TTFT (ms)", "{:.0f}"), ("p99_ttft_ms", "P99 TTFT (ms)", "{:.0f}"),
        ("median_tpot_ms", "P50 TPOT (ms)", "{:.2f}"), ("p99_tpot_ms", "P99 TPOT (ms)", "{:.2f}"),
        ("mean_e2el_ms", "Mean E2E (ms)", "{:.0f}"), ("p99_e2el_ms", "P99 E2E (ms)", "{:.0f}"),
        ("request_goodput", "Goodput (req/s)", "{:.2f}"), ("slo_attainment_pct", "Within SLO (%)", "{:.1f}"),
        ("preemptions", "Decode preemptions", "{:d}"), ("migrations", "Migrations (migrated)", "{:d}"),
        ("migrations_other", "Migrations (not migrated)", "{:d}"),
        ("mean_downtime_ms", "Mean migration downtime (ms)", "{:.1f}"),
        ("kv_spread_pct", "Mean KV usage spread (pp)", "{:.1f}"),
        ("kv_mean_pct", "Mean KV usage (%)", "{:.1f}"), ("kv_peak_pct", "Peak KV usage (%)", "{:.1f}"),
        ("gateway_peak_rss_mb", "Gateway peak RSS (MB)", "{:.0f}"),
        ("scheduler_peak_rss_mb", "Scheduler peak RSS (MB)", "{:.0f}")]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma-separated, of {', '.join(CONFIGS)}")
    s = p.add_argument_group("stack (ferry up)")
    s.add_argument("--prefill", type=int, default=2, help="prefill workers")
    s.add_argument("--decode", type=int, default=4, help="decode workers")
    s.add_argument("--sim-profile", default=str(PROFILE), help="sim engine performance profile (name or YAML)")
    s.add_argument("--sim-num-blocks", type=int, default=1280,
                   help="KV blocks (16 tokens) of each worker; 1280 = 20k tokens = 10 GiB of LLaMA-7B KV, "
                        "about what an A10 holds after the weights")
    s.add_argument("--migration-interval-s", type=float, default=0.5,
                   help="how often the ferry configuration runs the migration policies")
    s.add_argument("--scheduler-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra scheduler setting for every configuration (ferry up --scheduler-arg)")
    w = p.add_argument_group("workload (ferry bench)")
    w.add_argument("--trace", type=Path, default=TRACE)
    w.add_argument("--num-prompts", type=int, default=450)
    w.add_argument("--trace-start", type=int, default=0, help="first trace row")
    w.add_argument("--trace-time-scale", type=float, default=1.0, help="multiply inter-arrival gaps")
    w.add_argument("--length-scale", type=float, default=1.0, help="multiply input and output lengths")
    w.add_argument("--max-input-len", type=int, default=8192, help="cap (the default cuts nothing)")
    w.add_argument("--max-output-len", type=int, default=2048, help="cap (the default cuts nothing)")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--slo", default="ttft:1000,tpot:100", help="SLOs for goodput (ms): ~3x the profile's unloaded decode step")
    o = p.add_argument_group("output")
    o.add_argument("--json", type=Path, default=None, help="write settings and results here")
    o.add_argument("--log-dir", type=Path, default=None, help="keep the stacks' logs here (default: discarded)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if not names or unknown:
        p.error(f"--configs: unknown {unknown or 'none given'}; use some of {', '.join(CONFIGS)}")
    args.configs = names
    if args.prefill < 1 or args.decode < 2:
        p.error("--prefill >= 1 and --decode >= 2 (migration needs two decode workers)")
    if args.sim_num_blocks < 1 or args.num_prompts < 1 or args.migration_interval_s <= 0:
        p.error("--sim-num-blocks, --num-prompts and --migration-interval-s must be > 0")
    return args


def scheduler_args(config: str, args: argparse.Namespace, metrics_port: int) -> list[str]:
    settings = {"metrics-port": str(metrics_port), **CONFIGS[config]}
    settings.setdefault("migration-interval-s", f"{args.migration_interval_s:g}")
    out = []
    for item in [f"{k}={v}" for k, v in settings.items()] + args.scheduler_arg:
        out += ["--scheduler-arg", item]
    return out


def up_command(config: str, args: argparse.Namespace, port: int, metrics_port: int, log_dir: Path) -> list[str]:
    return [sys.executable, "-m", "services.cli", "up", "--engine", "sim", "--sim-profile", args.sim_profile,
            "--sim-num-blocks", str(args.sim_num_blocks), "--prefill", str(args.prefill),
            "--decode", str(args.decode), "--port", str(port), "--log-dir", str(log_dir),
            *scheduler_args(config, args, metrics_port)]


def bench_command(config: str, args: argparse.Namespace, port: int, result_path: Path) -> list[str]:
    return [sys.executable, "-m", "services.cli", "bench", "--base-url", f"http://127.0.0.1:{port}",
            "--trace", str(args.trace), "--num-prompts", str(args.num_prompts),
            "--trace-start", str(args.trace_start), "--trace-time-scale", str(args.trace_time_scale),
            "--length-scale", str(args.length_scale), "--max-input-len", str(args.max_input_len),
            "--max-output-len", str(args.max_output_len), "--seed", str(args.seed), "--slo", args.slo,
            "--label", config, "--json", str(result_path), "--disable-tqdm"]


def scheduler_address(log: Path, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"scheduler listening on (\S+:\d+)", log.read_text(errors="replace"))
        if found:
            return found.group(1)
        time.sleep(0.1)
    raise RuntimeError(f"no 'scheduler listening on' line in {log}")


class ClusterPoller(threading.Thread):
    """Scheduler ListInstances twice a second: the decode workers' KV usage over the run."""

    def __init__(self, address: str) -> None:
        super().__init__(daemon=True)
        import grpc

        from services.gen.ferry.v1 import scheduler_pb2, scheduler_pb2_grpc
        self._request = scheduler_pb2.ListInstancesRequest()
        self._channel = grpc.insecure_channel(address)
        self._stub = scheduler_pb2_grpc.SchedulerStub(self._channel)
        self.samples: list[list[float]] = []     # per poll: used fraction of each decode worker
        self.done = threading.Event()

    def list(self):
        from services.gen.ferry.v1 import common_pb2
        reply = self._stub.ListInstances(self._request, timeout=5)
        return [s for s in reply.instances if s.instance.role == common_pb2.ROLE_DECODE]

    def run(self) -> None:
        while not self.done.wait(0.5):
            try:
                decode = self.list()
            except Exception:       # noqa: BLE001, S112 (a missed poll is only a missing sample)
                continue
            if decode:
                self.samples.append([1 - s.load.num_free_blocks / max(1, s.load.num_blocks) for s in decode])

    def summary(self) -> dict:
        busy = [s for s in self.samples if max(s) > 0]          # the idle tail would dilute the means
        if not busy:
            return {"kv_spread_pct": 0.0, "kv_mean_pct": 0.0, "kv_peak_pct": 0.0, "kv_samples": 0}
        return {"kv_spread_pct": 100 * sum(max(s) - min(s) for s in busy) / len(busy),
                "kv_mean_pct": 100 * sum(sum(s) / len(s) for s in busy) / len(busy),
                "kv_peak_pct": 100 * max(max(s) for s in busy), "kv_samples": len(busy)}

    def close(self) -> None:
        self._channel.close()


def scrape_migrations(metrics_port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        return parse_migrations(r.read().decode())


def parse_migrations(text: str) -> dict:
    """ferry_scheduler_migrations_total and the downtime histogram, from the scheduler's /metrics text."""
    by_outcome: dict[str, float] = {}
    by_reason: dict[str, float] = {}
    values: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"ferry_scheduler_migrations_total\{([^}]*)\} (\S+)", line)
        if m:          # prometheus_client writes the labels in name order: outcome, then reason
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            outcome, reason, value = labels.get("outcome", "?"), labels.get("reason", "?"), float(m.group(2))
            by_outcome[outcome] = by_outcome.get(outcome, 0) + value
            by_reason[reason] = by_reason.get(reason, 0) + value
        m = re.match(r"(ferry_scheduler_migration_(?:downtime|duration)_seconds_(?:sum|count)|"
                     r"ferry_scheduler_migration_bytes_total)(?:\{[^}]*\})? (\S+)", line)
        if m:
            values[m.group(1)] = values.get(m.group(1), 0) + float(m.group(2))
    count = values.get("ferry_scheduler_migration_downtime_seconds_count", 0)
    migrated = int(by_outcome.get("migrated", 0))
    return {"migrations": migrated, "migrations_other": int(sum(by_outcome.values())) - migrated,
            "migrations_by_outcome": by_outcome, "migrations_by_reason": by_reason,
            "mean_downtime_ms": 1e3 * values.get("ferry_scheduler_migration_downtime_seconds_sum", 0) / count
            if count else None,
            "mean_migration_duration_ms": 1e3 * values.get("ferry_scheduler_migration_duration_seconds_sum", 0)
            / count if count else None,
            "migration_bytes": values.get("ferry_scheduler_migration_bytes_total", 0)}


def start_stack(cmd: list[str], log_dir: Path) -> subprocess.Popen:
    up = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = []
    for line in up.stdout:
        lines.append(line)
        if "Press Ctrl-C" in line:
            return up
    up.wait()
    raise RuntimeError(f"ferry up exited with {up.returncode} (logs in {log_dir}):\n{''.join(lines[-20:])}")


def run_config(config: str, args: argparse.Namespace, out_dir: Path) -> dict:
    port, metrics_port = free_port(), free_port()
    log_dir = out_dir / f"logs-{config}"
    cmd = up_command(config, args, port, metrics_port, log_dir)
    print(f"\n### {config}: {' '.join(cmd[2:])}", flush=True)
    started = time.monotonic()
    for attempt in range(3):
        try:
            up = start_stack(cmd, log_dir)
            break
        except RuntimeError as e:   # ferry up picks free ports before its children bind them: a race
            if attempt == 2:
                raise
            print(f"### {config}: ferry up failed to start, trying again: {str(e).splitlines()[0]}", flush=True)
    threading.Thread(target=lambda: [None for _ in up.stdout], daemon=True).start()   # keep the pipe drained
    poller = None
    try:
        pids = children(up.pid)
        memory = MemorySampler(pids)
        memory.start()
        poller = ClusterPoller(scheduler_address(log_dir / "scheduler.log"))
        poller.start()
        result_path = out_dir / f"llumnix-{config}.json"
        bench = bench_command(config, args, port, result_path)
        print(f"### {config}: {' '.join(bench[2:])}", flush=True)
        subprocess.run(bench, cwd=ROOT, check=True)
        memory.done.set()
        poller.done.set()
        memory.join()
        poller.join()
        decode = poller.list()
        migrations = scrape_migrations(metrics_port)
    finally:
        if poller is not None:
            poller.close()
        up.send_signal(signal.SIGINT)
        up.wait(60)
    result = json.loads(result_path.read_text())
    summary = result["summary"]
    summary["preemptions"] = sum(s.load.num_preemptions for s in decode)
    summary["preemptions_by_worker"] = {s.instance.instance_id: s.load.num_preemptions for s in decode}
    summary.update(migrations)
    summary.update(poller.summary())
    peaks: dict[str, float] = {}
    for name, mb in memory.peak.items():        # "gateway-1234" -> gateway (the largest of a kind)
        kind = name.rsplit("-", 1)[0]
        peaks[kind] = max(peaks.get(kind, 0.0), mb)
    summary["gateway_peak_rss_mb"] = peaks.get("gateway")
    summary["scheduler_peak_rss_mb"] = peaks.get("scheduler")
    result["peak_rss_mb"] = peaks
    result["ferry_up"] = cmd[2:]
    result["wall_s"] = time.monotonic() - started
    result["loadavg_1m_at_end"] = os.getloadavg()[0]     # other work on the machine skews real-time pacing
    return result


def format_table(results: dict[str, dict]) -> str:
    lines = [f"{'':32}" + "".join(f"{name:>20}" for name in results)]
    for key, label, fmt in ROWS:
        cells = []
        for r in results.values():
            v = r["summary"].get(key)
            cells.append(f"{fmt.format(v) if isinstance(v, (int, float)) else '-':>20}")
        lines.append(f"{label:32}" + "".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.trace.is_file():
        print(f"trace {args.trace} not found (it lives in ../shared/data/traces/)", file=sys.stderr)
        return 1
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="ferry-llumnix-") as tmp:
        out_dir = args.log_dir or Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        for config in args.configs:
            results[config] = run_config(config, args, out_dir)
            s = results[config]["summary"]
            print(f"### {config}: {results[config]['wall_s']:.0f} s, preemptions {s['preemptions']}, "
                  f"migrations {s['migrations']} (+{s['migrations_other']} not migrated)", flush=True)
    print("\n" + format_table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"settings": settings, "results": results}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
