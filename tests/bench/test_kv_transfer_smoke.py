"""Smoke run of bench/kv_transfer.py part 1 (gRPC PushKV vs raw TCP on loopback) in --quick mode."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.procs import ROOT


@pytest.mark.slow
def test_kv_transfer_throughput_quick_writes_the_json(tmp_path):
    out = tmp_path / "kv.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "kv_transfer.py"), "--parts", "throughput",
                           "--quick", "--json", str(out)], check=False, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| payload |" in proc.stdout and "gRPC/TCP" in proc.stdout

    result = json.loads(out.read_text())
    assert result["quick"] is True and "ttft" not in result
    assert result["peak_rss_mib"] > 0
    tp = result["throughput"]
    assert {"cases", "overall", "peak_rss_mib", "child_env", "grpc_options", "chunk_bytes"} <= tp.keys()
    assert set(tp["peak_rss_mib"]) == {"grpc-recv", "grpc-send", "tcp-recv", "tcp-send"}
    assert tp["overall"]["grpc_gbps"] > 0 and tp["overall"]["tcp_gbps"] > 0
    assert tp["overall"]["ratio"] == pytest.approx(tp["overall"]["grpc_gbps"] / tp["overall"]["tcp_gbps"])
    for case in tp["cases"]:
        assert {"payload", "tokens", "bytes", "stages", "grpc", "tcp", "ratio"} <= case.keys()
        assert case["bytes"] == -(-case["tokens"] // 16) * 737_280
        for kind in ("grpc", "tcp"):
            assert len(case[kind]["latency_ms_all"]) == tp["repeats"]
            assert case[kind]["gbps_median"] > 0 and case[kind]["latency_ms_median"] > 0
    assert any(case["stages"] > 1 for case in tp["cases"]), "a staged (multi-stage) request is covered"
