"""bench/llumnix.py: its arguments become the right `ferry up` / `ferry bench` commands, the scheduler's
metrics text is read right; and (slow) one tiny run of one configuration end to end."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from services.platforms import local
from tests.procs import ROOT


def _load_llumnix():
    """tests/bench can shadow the top-level `bench` package under pytest: import bench/llumnix.py
    (and the bench.serving helpers it uses) from the repository root, then put things back."""
    shadow = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "bench" or k.startswith("bench.")}
    sys.path.insert(0, str(ROOT))
    try:
        spec = importlib.util.spec_from_file_location("bench_llumnix", ROOT / "bench" / "llumnix.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT))
        for k in [k for k in sys.modules if k == "bench" or k.startswith("bench.")]:
            del sys.modules[k]
        sys.modules.update(shadow)


llumnix = _load_llumnix()

METRICS = """\
# TYPE ferry_scheduler_migrations_total counter
ferry_scheduler_migrations_total{outcome="migrated",reason="load_balance"} 5.0
ferry_scheduler_migrations_total{outcome="migrated",reason="defragmentation"} 2.0
ferry_scheduler_migrations_total{reason="load_balance",outcome="failed"} 1.0
ferry_scheduler_migration_downtime_seconds_count 7.0
ferry_scheduler_migration_downtime_seconds_sum 0.14
ferry_scheduler_migration_duration_seconds_count 7.0
ferry_scheduler_migration_duration_seconds_sum 0.7
ferry_scheduler_migration_bytes_total{reason="load_balance"} 1000.0
ferry_scheduler_migration_bytes_total{reason="defragmentation"} 24.0
"""


def test_defaults_run_the_three_configurations_on_four_sim_decode_workers():
    args = llumnix.parse_args([])
    assert args.configs == ["round_robin", "load_aware", "ferry"]
    cmd = llumnix.up_command("round_robin", args, 8000, 9100, ROOT / "logs")
    assert cmd[cmd.index("--engine") + 1] == "sim" and cmd[cmd.index("--decode") + 1] == "4"
    assert cmd[cmd.index("--sim-num-blocks") + 1] == str(args.sim_num_blocks)
    up = local.build_parser().parse_args(cmd[4:])           # `ferry up` takes the command as built
    assert up.engine == "sim" and up.decode == 4
    flags = local.scheduler_flags(up.scheduler_arg)
    assert flags == ["--metrics-port", "9100", "--routing-config", "round_robin", "--migration-interval-s", "0"]


@pytest.mark.parametrize(("config", "routing", "interval"), [
    ("round_robin", "round_robin", "0"), ("load_aware", "load_aware", "0"), ("ferry", "ferry", "0.25"),
    ("ferry_no_migration", "ferry", "0")])
def test_each_configuration_sets_routing_and_migration(config, routing, interval):
    args = llumnix.parse_args(["--migration-interval-s", "0.25", "--scheduler-arg", "migration-load-balance-gap=8"])
    items = llumnix.scheduler_args(config, args, 9100)[1::2]
    assert f"routing-config={routing}" in items and f"migration-interval-s={interval}" in items
    assert items[-1] == "migration-load-balance-gap=8"       # extra settings go to every configuration


def test_every_configuration_replays_the_same_requests(tmp_path):
    args = llumnix.parse_args(["--num-prompts", "7", "--seed", "3"])
    commands = [llumnix.bench_command(c, args, 8000, tmp_path / "x.json") for c in llumnix.CONFIGS]
    for cmd in commands:
        i = cmd.index("--label")
        del cmd[i:i + 2]
    assert all(cmd == commands[0] for cmd in commands)
    assert commands[0][commands[0].index("--seed") + 1] == "3"


@pytest.mark.parametrize("argv", [["--configs", "fifo"], ["--configs", ","], ["--decode", "1"],
                                  ["--migration-interval-s", "0"], ["--sim-num-blocks", "0"]])
def test_bad_arguments_stop_with_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        llumnix.parse_args(argv)
    assert e.value.code == 2


def test_migration_metrics_are_summed_by_outcome_and_reason():
    from prometheus_client import generate_latest

    from services.scheduler.metrics import SchedulerMetrics  # the real exposition, label order included
    metrics = SchedulerMetrics()
    metrics.migrations.labels(reason="load_balance", outcome="migrated").inc(3)
    assert llumnix.parse_migrations(generate_latest(metrics.registry).decode())["migrations"] == 3
    m = llumnix.parse_migrations(METRICS)
    assert m["migrations"] == 7 and m["migrations_other"] == 1
    assert m["migrations_by_reason"] == {"load_balance": 6.0, "defragmentation": 2.0}
    assert m["mean_downtime_ms"] == pytest.approx(20.0) and m["migration_bytes"] == 1024
    assert llumnix.parse_migrations("")["mean_downtime_ms"] is None


@pytest.mark.parametrize(("item", "message"), [("foo=1", "no setting 'foo'"), ("port=1", "sets --port itself"),
                                               ("routing-config", "KEY=VALUE")])
def test_ferry_up_refuses_a_bad_scheduler_arg(item, message):
    with pytest.raises(ValueError, match=message):
        local.scheduler_flags([item])
    assert local.scheduler_flags(["--migration_interval_s=0"]) == ["--migration-interval-s", "0"]


@pytest.mark.slow
def test_one_tiny_run_reports_latency_preemptions_and_migrations(tmp_path):
    out = tmp_path / "llumnix.json"
    trace = tmp_path / "trace.csv"          # the trace's format; the shared traces may not be beside a clone
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(
        f"2023-11-16 18:15:{40 + i:02d}.5000000,{200 + 50 * i},{20 + 5 * i}\n" for i in range(6)))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "llumnix.py"), "--configs", "ferry",
                           "--prefill", "1", "--decode", "2", "--num-prompts", "6", "--trace", str(trace),
                           "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "P99 TPOT (ms)" in proc.stdout and "Decode preemptions" in proc.stdout
    summary = json.loads(out.read_text())["results"]["ferry"]["summary"]
    assert summary["completed"] == 6
    assert summary["preemptions"] >= 0 and summary["migrations"] >= 0
    assert set(summary["preemptions_by_worker"]) and summary["scheduler_peak_rss_mb"] > 0
