"""`ferry admin` against a real scheduler process: the instance table, a drain and its cancel, a
preemption notice, and the scheduler's own error for an unknown instance."""
from __future__ import annotations

import subprocess
import sys

import pytest

from services.gen.ferry.v1 import common_pb2
from tests.procs import ROOT
from tests.scheduler.test_scheduler_service import start_scheduler

pytestmark = pytest.mark.integration


def admin(scheduler, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", "admin", "--scheduler",
                           f"127.0.0.1:{scheduler.port}", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=False)


def test_admin_lists_drains_and_preempts(tmp_path):
    scheduler = start_scheduler(tmp_path / "scheduler.log")
    try:
        scheduler.register("adm-d0", common_pb2.ROLE_DECODE, "m", port=7001)
        scheduler.register("adm-d1", common_pb2.ROLE_DECODE, "m", port=7002)
        scheduler.beat("adm-d0", free=40, running=3)
        scheduler.beat("adm-d1")

        out = admin(scheduler, "instances")
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0].split()[:4] == ["INSTANCE", "ROLE", "HEALTHY", "DRAINING"]
        assert lines[1].split() == ["adm-d0", "decode", "yes", "no", "3", "0", "40/100", "127.0.0.1:7001"]

        out = admin(scheduler, "drain", "adm-d1")
        assert out.returncode == 0 and "draining adm-d1" in out.stdout, out.stderr
        assert scheduler.instances()["adm-d1"].load.draining
        assert admin(scheduler, "drain", "adm-d1", "--cancel").returncode == 0
        assert not scheduler.instances()["adm-d1"].load.draining

        out = admin(scheduler, "preempt", "adm-d0", "--in", "30")
        assert out.returncode == 0 and "preempting adm-d0 in 30 s" in out.stdout, out.stderr
        assert scheduler.instances()["adm-d0"].load.draining

        out = admin(scheduler, "preempt", "nobody")
        assert out.returncode == 1 and "NOT_FOUND" in out.stderr and "nobody" in out.stderr
        out = admin(scheduler, "preempt", "adm-d0", "--in", "-5")
        assert out.returncode == 2 and "--in" in out.stderr
    finally:
        scheduler.close()
