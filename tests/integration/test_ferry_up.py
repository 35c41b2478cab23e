"""`ferry up` as a process: it serves, and Ctrl-C (SIGINT) stops every process it started, exit code 0."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from tests.integration.stack import MODEL
from tests.procs import ROOT, eventually, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat fields after the command name (state is [0], ppid [1], starttime [19])."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def children_of(pid: int) -> dict[tuple[int, str], str]:
    """(pid, start time) -> command line of every live child of `pid`."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat(int(entry.name))
        if fields is None or int(fields[1]) != pid:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        out[(int(entry.name), fields[19])] = cmdline
    return out


def alive(child: tuple[int, str]) -> bool:
    pid, started = child
    fields = _stat(pid)
    return fields is not None and fields[19] == started and fields[0] != "Z"


def service_name(cmdline: str) -> str:
    words = cmdline.split()
    if "redis-server" in words[0]:
        return "redis"
    name = words[words.index("serve") + 1]
    return "worker" if "--role" in words and words[words.index("--role") + 1] == "both" else name


@pytest.mark.parametrize("colocated", [False, True], ids=["disaggregated", "colocated"])
def test_ferry_up_serves_then_ctrl_c_stops_every_process(tmp_path, smollm2_path, colocated):
    port, log_dir, out = free_port(), tmp_path / "logs", tmp_path / "up.out"
    args = [sys.executable, "-m", "services.cli", "up", "--model", str(smollm2_path), "--port", str(port),
            "--log-dir", str(log_dir), "--kv-cache-memory-gb", "0.25", *(["--colocated"] if colocated else [])]
    with open(out, "wb") as f:
        proc = subprocess.Popen(args, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=f,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    children: dict[tuple[int, str], str] = {}

    def logs() -> str:
        text = [out.read_text(errors="replace")]
        for log in sorted(log_dir.glob("*.log")):
            text.append(f"---- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(text)

    try:
        assert eventually(lambda: proc.poll() is not None or "Press Ctrl-C" in out.read_text(), timeout=240,
                          interval=0.2), logs()
        assert proc.poll() is None, logs()
        assert f"http://127.0.0.1:{port}" in out.read_text()
        children = children_of(proc.pid)
        expected = ["gateway", "kvstore", "redis", "scheduler"] + (["worker"] if colocated else ["decode", "prefill"])
        assert sorted(service_name(c) for c in children.values()) == sorted(expected), children

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=120, max_retries=0)
        reply = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0,
                                               messages=[{"role": "user", "content": "What is 2 + 2?"}])
        assert reply.choices[0].message.content and reply.usage.completion_tokens >= 1

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, logs()
        assert eventually(lambda: not any(alive(c) for c in children), timeout=15), \
            {c: cmd for c, cmd in children.items() if alive(c)}
        assert "stopping" in out.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid, started in children:
            if alive((pid, started)):
                os.kill(pid, signal.SIGKILL)
