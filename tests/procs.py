"""Real processes on loopback for integration tests: free ports, start a service, wait, stop by PID."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def start(args: list[str], *, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `python -m services.cli <args>` in its own process group, output to `log`."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    out = open(log, "ab")  # noqa: SIM115 (the child owns it)
    return subprocess.Popen([sys.executable, "-m", "services.cli", *args], cwd=ROOT, env=full_env,
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def start_redis(port: int, folder: Path, log: Path | None = None) -> subprocess.Popen:
    """A real redis-server on 127.0.0.1:`port`, no persistence, in its own process group; returns once it
    listens. Skips the test when redis-server is not installed."""
    import pytest
    redis = shutil.which("redis-server")
    if redis is None:
        pytest.skip("redis-server is not installed (apt install redis-server)")
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 (the child owns it)
    proc = subprocess.Popen([redis, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--daemonize", "no", "--dir", str(folder)],
                            cwd=folder, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    if log:
        out.close()
    wait_for_port(port, proc, timeout=30)
    return proc


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def interrupt(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Ctrl-C for the process alone (it stops what it started), SIGKILL for its group if it lingers."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def eventually(check: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return check()
