"""Ferry on Ray: `ferry up --platform ray` on a local Ray instance it starts itself.

One run of the real command: sim-engine pools (autoscaled by the scheduler, carried out by Ray Serve)
beside one real-model prefill/decode pair; requests through the gateway with the `openai` client; the
decode pool scaled 1 -> 2 by a load step and back to 1 when it falls, with streams in flight that all
complete (the replica Ray stops is drained first); a worker process killed -9 and its replica replaced
by Serve (and dropped from the scheduler's registry); Ray's closed-network settings (token auth,
loopback, no usage reporting); Ferry's own service token and mutual TLS reaching every replica through
Ray's runtime env (a plaintext client gets nothing); and nothing left behind after Ctrl-C: no process,
no temp file.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import openai
import pytest

from services.common import grpc_util
from services.gen.ferry.v1 import scheduler_pb2, scheduler_pb2_grpc
from tests.integration.stack import MODEL
from tests.integration.streams import Load
from tests.integration.test_autoscaling import PROFILE, SLO_TPOT_S, metric
from tests.procs import ROOT, eventually, free_port, interrupt

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.soak]

SIM_MODEL = "smollm2-sim"
HIGH, LOW = 24, 4           # streams in each phase
LONG, MAX_LONG = 600, 6     # streams still decoding when Ray stops a replica (~30 s; a short prompt, so
                            # their KV costs the sim's steps little); at most this many are placed


def instances(scheduler: str) -> list[scheduler_pb2.InstanceStatus]:
    with grpc_util.channel(scheduler) as channel:       # with the stack's token and certificate
        return list(scheduler_pb2_grpc.SchedulerStub(channel).ListInstances(
            scheduler_pb2.ListInstancesRequest(), timeout=5).instances)


def pool(scheduler: str, name: str) -> list[str]:
    """Instance ids of a Ray pool deployment's workers (`decode.<replica>`), healthy and not draining."""
    return sorted(s.instance.instance_id for s in instances(scheduler)
                  if s.instance.instance_id.rpartition(".")[0] == name and s.healthy and not s.load.draining)


def holding_long(scheduler: str, short: int) -> dict[str, int]:
    """Sim decode replica -> its requests with more than `short` tokens still to generate."""
    return {s.instance.instance_id: sum(r.max_tokens > short for r in s.load.requests)
            for s in instances(scheduler) if s.instance.instance_id.rpartition(".")[0] == "decode"}


def processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                found.append(f"{entry.name}: {cmdline[:160]}")
    return found


def gcs_call(address: str, token: str | None) -> grpc.StatusCode:
    """One call to Ray's GCS (NodeInfoGcsService.GetAllNodeInfo, an empty request), with or without the
    cluster's token."""
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetAllNodeInfo")
        metadata = [("authorization", f"Bearer {token}")] if token else None
        try:
            call(b"", timeout=5, metadata=metadata)
            return grpc.StatusCode.OK
        except grpc.RpcError as e:
            return e.code()


def test_ferry_on_a_local_ray_instance_scales_through_the_scheduler_and_leaves_nothing(tmp_path, monkeypatch):
    profile = tmp_path / "profile.yaml"
    profile.write_text(PROFILE)
    port, scheduler_metrics, out = free_port(), free_port(), tmp_path / "up.out"
    args = [sys.executable, "-m", "services.cli", "up", "--platform", "ray", "--port", str(port),
            "--engine", "sim", "--sim-profile", str(profile), "--sim-num-blocks", "4096",
            "--served-model-name", SIM_MODEL, "--llm-pair", "--service-auth", "--service-tls",
            "--autoscale", "--max-prefill", "1", "--max-decode", "2", "--autoscale-interval", "1",
            "--slo-tpot-ms", str(SLO_TPOT_S * 1e3), "--drain-timeout", "30",
            "--scheduler-arg", f"metrics-port={scheduler_metrics}",
            "--scheduler-arg", "autoscale-window-s=6",
            "--scheduler-arg", "autoscale-scale-up-after-s=2",
            "--scheduler-arg", "autoscale-scale-down-after-s=5",
            "--scheduler-arg", "migration-policies=drain"]     # streams move only when a replica stops
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    with open(out, "wb") as f:
        proc = subprocess.Popen(args, cwd=ROOT, env={**env, "HF_HUB_OFFLINE": "1"}, stdout=f,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}/v1"
    load = Load(base_url, SIM_MODEL, SLO_TPOT_S)
    long = Load(base_url, SIM_MODEL, SLO_TPOT_S, max_tokens=LONG, prompt="hello")
    temp_dir: Path | None = None
    secrets_dir: Path | None = None

    def text() -> str:
        return out.read_text(errors="replace")

    def logs() -> str:
        parts = [text()]
        if temp_dir is not None:
            for log in sorted((temp_dir / "logs").glob("*.log")):
                parts.append(f"---- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-12:]))
        return "\n".join(parts)

    try:
        assert eventually(lambda: proc.poll() is not None or "Press Ctrl-C" in text(), timeout=300,
                          interval=0.5), text()
        assert proc.poll() is None, text()
        temp_dir = Path(re.search(r"service logs: (/tmp/ferry-ray-\w+)/logs", text()).group(1))
        admin = re.search(r"FERRY_SERVICE_TOKEN_FILE=(\S+) FERRY_TLS_DIR=(\S+) ferry admin --scheduler (\S+) instances",
                          text())
        token, tls, scheduler = admin.groups()
        secrets_dir = Path(token).parent                       # made for this stack: no --log-dir
        assert Path(tls).parent == secrets_dir and secrets_dir.name.startswith("ferry-up-")
        with grpc.insecure_channel(scheduler) as channel, pytest.raises(grpc.RpcError) as plaintext:
            scheduler_pb2_grpc.SchedulerStub(channel).ListInstances(scheduler_pb2.ListInstancesRequest(), timeout=5)
        assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE     # every replica speaks TLS only
        monkeypatch.setenv("FERRY_SERVICE_TOKEN_FILE", token)          # this test's own calls: as `ferry admin`
        monkeypatch.setenv("FERRY_TLS_DIR", tls)

        # Ray runs closed: loopback only, a token on every call, no usage reporting
        assert scheduler.startswith("127.0.0.1:")
        token_file = temp_dir / "auth_token"
        assert token_file.stat().st_mode & 0o777 == 0o600
        gcs = re.search(r"RAY_ADDRESS=(\S+) RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=(\S+) ray status", text()).group(1)
        assert gcs.startswith("127.0.0.1:"), gcs
        assert gcs_call(gcs, None) == grpc.StatusCode.UNAUTHENTICATED
        assert gcs_call(gcs, "not-the-token") == grpc.StatusCode.UNAUTHENTICATED
        assert gcs_call(gcs, token_file.read_text()) == grpc.StatusCode.OK
        raylet = next(p.split(":")[0] for p in processes_mentioning(str(temp_dir)) if "raylet/raylet" in p)
        environ = Path(f"/proc/{raylet}/environ").read_bytes().split(b"\0")
        assert b"RAY_USAGE_STATS_ENABLED=0" in environ and b"RAY_AUTH_MODE=token" in environ

        # Both models serve through the gateway: the real one greedy, the sim pools as placeholders
        client = openai.OpenAI(base_url=base_url, api_key="x", timeout=120, max_retries=0)
        assert {m.id for m in client.models.list().data} == {MODEL, SIM_MODEL}
        chat = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=12, messages=[
            {"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in chat.choices[0].message.content, chat
        sim = client.completions.create(model=SIM_MODEL, prompt="hello", max_tokens=8, extra_body={"ignore_eos": True})
        assert sim.usage.completion_tokens == 8
        assert len(pool(scheduler, "decode")) == 1 and len(pool(scheduler, "decode-llm")) == 1

        # Load step up: the scheduler recommends a second decode replica, Ray Serve starts it
        load.add(HIGH)
        assert eventually(lambda: len(pool(scheduler, "decode")) == 2, timeout=90, interval=0.5), logs()
        assert "ray: decode 1 -> 2 replicas running" in text() or eventually(
            lambda: "ray: decode 1 -> 2 replicas running" in text(), timeout=5), logs()
        assert len(pool(scheduler, "decode-llm")) == 1           # the other model's pool is not sized
        time.sleep(5)

        # Load falls: back to one replica; the one Ray stops is drained first, its streams move on.
        # First long streams are placed until each replica holds one, so whichever replica Ray stops
        # holds a stream that is still decoding then (a short one may end during its move). The closed
        # loop's streams start in waves, so which replica is freer changes by the second: one placement
        # a second samples both.
        while min(holding_long(scheduler, load.max_tokens).values()) == 0 and len(long.threads) < MAX_LONG:
            long.add(1)
            assert eventually(lambda: sum(holding_long(scheduler, load.max_tokens).values()) >= len(long.threads),
                              timeout=20, interval=0.2), logs()
            time.sleep(1)
        placed = holding_long(scheduler, load.max_tokens)
        assert min(placed.values()) >= 1, placed
        load.remove(HIGH - LOW)
        assert eventually(lambda: len(pool(scheduler, "decode")) == 1 and not any(
            s.instance.instance_id.startswith("decode.") and s.load.draining for s in instances(scheduler)),
            timeout=120, interval=0.5), logs()
        assert eventually(lambda: "ray: decode 2 -> 1 replicas running" in text(), timeout=30), logs()
        moved = metric(scheduler_metrics, "ferry_scheduler_migrations_total", reason="drain", outcome="migrated")
        assert moved and moved >= 1, logs()                      # streams were in flight on the stopped one
        print(f"\nray: long streams placed {placed}; {moved:.0f} stream(s) moved by the drain")
        last = time.monotonic()
        assert eventually(lambda: len(load.between(last, time.monotonic())) >= LOW, timeout=60), logs()
        load.join(timeout=60)
        long.join(timeout=60)                                    # the moved streams end in full
        failed = [d.error for d in load.done + long.done if d.tpot_s is None]
        assert not failed, failed[:5]
        assert len(load.done) >= 2 * HIGH and len(long.done) >= len(long.threads), (len(load.done), len(long.done))

        # A worker dies (kill -9): Serve's health check fails, it replaces the replica, and the
        # scheduler's registry follows Ray's view
        (old,) = pool(scheduler, "prefill")
        victim = [p.split(":")[0] for p in processes_mentioning(f"--instance-id {old}")]
        assert len(victim) == 1, victim
        os.kill(int(victim[0]), signal.SIGKILL)
        assert eventually(lambda: (ids := pool(scheduler, "prefill")) and ids[0] != old, timeout=90,
                          interval=0.5), logs()
        # a dead worker stays listed (unhealthy) unless deregistered: the sync does it once Serve has
        # stopped the old replica, which may be a tick after the new one registered
        assert eventually(lambda: old not in {s.instance.instance_id for s in instances(scheduler)}, timeout=30,
                          interval=0.5), logs()
        assert f"ray: {old} has no replica any more: deregistered" in text()
        again = client.completions.create(model=SIM_MODEL, prompt="hello", max_tokens=8,
                                          extra_body={"ignore_eos": True})
        assert again.usage.completion_tokens == 8
    finally:
        load.join(timeout=30)
        long.join(timeout=30)
        interrupt(proc, timeout=120)
    assert proc.returncode == 0, text()

    # Nothing left behind: no process of the Ray instance or of Ferry's services, no temp files
    assert temp_dir is not None
    assert eventually(lambda: not processes_mentioning(str(temp_dir)), timeout=30), processes_mentioning(str(temp_dir))
    for trace in (f"--port {port}", scheduler):            # the gateway; every service that used the scheduler
        assert not processes_mentioning(trace), processes_mentioning(trace)
    assert not temp_dir.exists() and not secrets_dir.exists()
