"""Autoscaling on the local platform: `ferry up --autoscale` with sim-engine workers, driven by real load.

The profile below makes one decode worker too slow for a 60 ms TPOT SLO at 24 concurrent streams (its
step is ~40 ms of weight reads plus ~30 ms of KV reads at that batch), while three share the batch within
it. So a load step up must make the scheduler recommend more decode workers, `ferry up` start them, and
the TPOT attainment the clients measure recover. When the load falls to four streams, the scheduler
recommends fewer, and `ferry up` drains workers before stopping them, with streams in flight and no
failed request.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.integration.stack import MODEL
from tests.integration.streams import Load, attainment
from tests.procs import ROOT, eventually, free_port, interrupt

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.soak]

SLO_TPOT_S = 0.060
PROFILE = """\
name: autoscale-test
num_params: 4.0e9
num_layers: 32
hidden_size: 4096
kv_bytes_per_token: 714000
weight_bytes: 8.0e9
flops: 1.0e14
memory_bandwidth: 2.0e11
vocab_size: 49152
max_model_len: 4096
"""
HIGH, LOW = 24, 4       # streams in each phase


def metric(port: int, name: str, **labels: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(rf"{name}(?:{{(.*)}})? (\S+)$", line)
        if m and ",".join(sorted((m.group(1) or "").split(","))) == want:
            return float(m.group(2))
    return None


def test_autoscaling_scales_decode_out_on_a_load_step_and_in_through_drain(tmp_path):
    profile = tmp_path / "profile.yaml"
    profile.write_text(PROFILE)
    port, scheduler_metrics, log_dir, out = free_port(), free_port(), tmp_path / "logs", tmp_path / "up.out"
    args = [sys.executable, "-m", "services.cli", "up", "--engine", "sim", "--sim-profile", str(profile),
            "--sim-num-blocks", "4096", "--port", str(port), "--log-dir", str(log_dir),
            "--autoscale", "--max-decode", "3", "--autoscale-interval", "1", "--slo-tpot-ms", str(SLO_TPOT_S * 1e3),
            "--scheduler-arg", f"metrics-port={scheduler_metrics}",
            "--scheduler-arg", "autoscale-window-s=6",
            "--scheduler-arg", "autoscale-scale-up-after-s=2",
            "--scheduler-arg", "autoscale-scale-down-after-s=5"]
    with open(out, "wb") as f:
        proc = subprocess.Popen(args, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=f,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    load = Load(f"http://127.0.0.1:{port}/v1", MODEL, SLO_TPOT_S)

    def logs() -> str:
        text = [out.read_text(errors="replace")]
        for log in sorted(log_dir.glob("*.log")):
            text.append(f"---- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(text)

    def scheduler(name: str, **labels: str) -> float:
        return metric(scheduler_metrics, name, **labels) or 0.0

    def decode_workers() -> float:
        return scheduler("ferry_scheduler_instances", role="decode", healthy="true")

    try:
        assert eventually(lambda: proc.poll() is not None or "Press Ctrl-C" in out.read_text(), timeout=120,
                          interval=0.2), logs()
        assert proc.poll() is None, logs()
        assert decode_workers() == 1

        # Load step up: one decode worker misses the TPOT SLO, the scheduler scales the pool out.
        step_up = time.monotonic()
        load.add(HIGH)
        assert eventually(lambda: decode_workers() >= 2, timeout=60, interval=0.5), logs()
        scaled = time.monotonic()
        before = load.between(step_up, scaled)
        assert before and attainment(before) < 0.95, [d.tpot_s for d in before]
        assert scheduler("ferry_scheduler_autoscaler_desired_replicas", pool="decode") >= 2
        ups = sum(scheduler("ferry_scheduler_autoscaler_decisions_total", pool="decode", direction="up",
                            reason=reason) for reason in ("demand", "slo", "kv"))
        assert ups >= 1, logs()
        assert re.search(r"autoscale: decode 1 -> [23] ", out.read_text()), logs()

        # Attainment recovers: requests sent once every recommended worker serves meet the SLO.
        assert eventually(lambda: decode_workers() == scheduler("ferry_scheduler_autoscaler_desired_replicas",
                                                                 pool="decode"), timeout=30, interval=0.5), logs()
        settled = time.monotonic() + 1.0
        time.sleep(20)
        after = load.between(settled, time.monotonic())
        assert len(after) >= 10, len(after)
        assert attainment(after) >= 0.95, sorted(d.tpot_s for d in after)

        # Load falls: the pool scales in, each worker drained before it stops, while streams run.
        peak = decode_workers()
        load.remove(HIGH - LOW)

        def drained() -> list[str]:
            return re.findall(r"autoscale: (decode-\d+) drained in [\d.]+ s and stopped", out.read_text())

        assert eventually(lambda: len(drained()) == peak - 1, timeout=90, interval=0.5), logs()
        assert decode_workers() == 1, logs()
        last = time.monotonic()             # the streams left go on, on the remaining worker
        assert eventually(lambda: len(load.between(last, time.monotonic())) >= LOW, timeout=30), logs()
    finally:
        load.join(timeout=30)
        interrupt(proc, timeout=60)
    failed = [d.error for d in load.done if d.tpot_s is None]
    assert not failed, failed[:5]
    assert len(load.done) >= 50, len(load.done)
