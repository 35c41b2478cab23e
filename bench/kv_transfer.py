"""P→D KV hand-off: gRPC `Worker.PushKV` vs raw TCP throughput, and TTFT with vs without disaggregation.

    python bench/kv_transfer.py --json bench/out/kv_transfer.json            # both parts (~15 min, 2 cores)
    python bench/kv_transfer.py --parts throughput --repeats 7               # part 1 only (~1.5 min)
    python bench/kv_transfer.py --parts throughput --quick                   # CI smoke (~10 s)
    python bench/kv_transfer.py --parts ttft --stack-args '--cpu-threads 2'  # part 2, 2 torch threads/worker

Part 1 (throughput): four child processes on loopback, so no two ends share a GIL:

    grpc-send --PushKV (stage_chunks, grpc_util.aio_channel)--> grpc-recv (read_stages -> KVPayload)
    tcp-send  --length header + bytes (sendall)-->              tcp-recv  (recv_into a preallocated buffer, ack)

Payloads are real `KVPayload`s with SmolLM2-135M's layout (30 layers x 2 x 16 tokens x 3 heads x 64
fp32 = 737,280 bytes/block) holding random bytes, for a 1k-, 4k- and 8k-token request (one stage each),
plus a bulk ~512 MiB request sent in stages of 128 blocks (the 2048-token prefill step budget). gRPC and
TCP runs alternate (one untimed warm-up each first); the time is from the first send to the reply
(gRPC) or the ack (TCP). Besides GB/s it reports the CPU seconds per GB that sender and receiver burn
(all threads, from /proc): on a shared 2-core machine that is steadier than wall time. `--malloc`,
`--chunk-bytes` and `--grpc-options` are the levers measured in docs/benchmarks/serving.md.

Part 2 (ttft): `ferry up` (1 prefill + 1 decode) and `ferry up --colocated`, each started as a
subprocess and stopped with SIGINT; N sequential streamed /v1/completions of random token-id prompts
(no prefix reuse), max_tokens 16, greedy, ignore_eos, after one warm-up per length; TTFT = first SSE
chunk with text, TPOT = (E2E - TTFT) / (tokens - 1). Also: peak RSS (VmHWM) and CPU seconds per
request of every process of the stack. Note that `ferry up` shares the cores out among its CPU workers
(on 2 cores: 1 torch thread each when disaggregated, 2 for the one colocated worker).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
BLOCK_BYTES = 737_280
STAGE_BLOCKS = 128                      # bulk: stages of one 2048-token prefill step
# name -> (prompt tokens, blocks per stage; 0 = one stage)
ALL_CASES = {"1k": (1024, 0), "4k": (4096, 0), "8k": (8192, 0), "bulk-512MiB": (11648, STAGE_BLOCKS),
             "bulk-128MiB": (2912, STAGE_BLOCKS), "2k-staged": (2048, 64)}
CASES = ["1k", "4k", "8k", "bulk-512MiB"]
QUICK_CASES = ["1k", "2k-staged"]
# glibc malloc of the children (`--malloc`). thresholds: keep buffers ≤ 32 MiB on the heap (no fresh
# mmap, so no page faults, per chunk) and never give freed memory back; tuned: also back malloc's
# memory with transparent huge pages (THP is `madvise` here), so the bigger buffers that still come
# from mmap fault in 2 MiB at a time, not 4 KiB.
MALLOC_ENV = {
    "default": {},
    "thresholds": {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**30)},
    "tuned": {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**30),
              "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
}
HEADER = struct.Struct("<QQB")          # raw TCP: meta length, data length, final stage


# ---- payloads (in the sender children) ----------------------------------------------------------
def layout():
    from services.engine.kv_transfer import KVLayout
    lay = KVLayout(model_id="SmolLM2-135M-Instruct", dtype="float32", block_size=16, num_layers=30,
                   num_kv_heads=3, head_dim=64)
    assert lay.bytes_per_block == BLOCK_BYTES
    return lay


def make_stages(request_id: str, num_tokens: int, stage_blocks: int, data: bytes) -> list:
    """The KVPayload stages of a request right after its prefill: prompt + first token, all KV full."""
    from services.common.block_keys import chain_keys
    from services.engine.kv_transfer import KVPayload
    from services.engine.sampling import SamplingParams

    lay = layout()
    token_ids = tuple((i * 7919) % 49000 + 10 for i in range(num_tokens + 1))
    num_blocks = -(-num_tokens // lay.block_size)
    keys = [k.hex() for k in chain_keys(token_ids[:num_tokens], lay.block_size)]
    step = stage_blocks or num_blocks
    stages = []
    for first in range(0, num_blocks, step):
        n = min(step, num_blocks - first)
        stages.append(KVPayload(
            layout=lay, request_id=request_id, token_ids=token_ids, num_prompt_tokens=num_tokens,
            num_computed_tokens=num_tokens, params=SamplingParams(max_tokens=16, temperature=0.0),
            seed=1234, first_block=first, num_blocks=n, block_keys=tuple(keys[first:first + n]),
            data=data[first * BLOCK_BYTES:(first + n) * BLOCK_BYTES]))
    return stages


class PayloadCache:
    def __init__(self) -> None:
        self.data: dict[tuple[int, int], list] = {}

    def get(self, num_tokens: int, stage_blocks: int) -> list:
        key = (num_tokens, stage_blocks)
        if key not in self.data:
            import numpy as np
            self.data.clear()                       # one case at a time: bounded memory
            n = -(-num_tokens // 16) * BLOCK_BYTES
            raw = np.random.default_rng(num_tokens).bytes(n)
            self.data[key] = make_stages("rid", num_tokens, stage_blocks, raw)
        return self.data[key]


def with_request_id(stages: list, rid: str) -> list:
    import dataclasses
    return [dataclasses.replace(s, request_id=rid) for s in stages]


# ---- children -----------------------------------------------------------------------------------
def apply_grpc_options(spec: str) -> None:
    """NAME=INT,NAME=- (drop) over grpc_util.OPTIONS, for measuring each option (`--grpc-option`)."""
    from services.common import grpc_util
    for item in filter(None, spec.split(",")):
        name, _, value = item.partition("=")
        grpc_util.OPTIONS[:] = [(k, v) for k, v in grpc_util.OPTIONS if k != name]
        if value != "-":
            grpc_util.OPTIONS.append((name, int(value)))


def reply(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def child_grpc_recv(args) -> None:
    from services.common.grpc_util import aio_server, bind
    from services.gen.ferry.v1 import worker_pb2, worker_pb2_grpc
    from services.worker.kv_stream import read_stages

    class Receiver(worker_pb2_grpc.WorkerServicer):
        async def PushKV(self, request_iterator, context):
            num_blocks = 0
            async for payload in read_stages(request_iterator):      # KVPayload.from_chunks per stage
                num_blocks += payload.num_blocks
                yield worker_pb2.PushKVReply(resumed=payload.is_final, num_blocks=num_blocks)

    async def main() -> None:
        server = aio_server()
        worker_pb2_grpc.add_WorkerServicer_to_server(Receiver(), server)
        port = bind(server, "127.0.0.1", 0)
        await server.start()
        reply({"port": port})
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)   # until the parent closes
        await server.stop(None)

    asyncio.run(main())


def child_grpc_send(args) -> None:
    from services.common.grpc_util import aio_channel
    from services.gen.ferry.v1 import worker_pb2_grpc
    from services.worker.kv_stream import CHUNK_BYTES, stage_chunks

    cache = PayloadCache()

    async def push(stub, stages: list) -> float:
        async def chunks():
            for stage in stages:
                for chunk in (stage_chunks(stage, args.chunk_bytes) if args.chunk_bytes else stage_chunks(stage)):
                    yield chunk
        t0 = time.perf_counter()
        async for r in stub.PushKV(chunks()):      # one reply per stage; the last says resumed
            pass
        dt = time.perf_counter() - t0
        assert r.resumed and r.num_blocks == sum(s.num_blocks for s in stages), r
        return dt

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with aio_channel(args.address) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            while line := await loop.run_in_executor(None, sys.stdin.readline):
                cmd = json.loads(line)
                stages = with_request_id(cache.get(cmd["tokens"], cmd["stage_blocks"]), cmd["rid"])
                dt = await push(stub, stages)
                reply({"seconds": dt, "bytes": sum(len(s.data) for s in stages),
                       "chunk_bytes": args.chunk_bytes or CHUNK_BYTES})

    asyncio.run(main())


def child_tcp_recv(args) -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    reply({"port": srv.getsockname()[1]})
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = memoryview(bytearray(args.max_bytes))

    def read_exact(view: memoryview) -> bool:
        while view:
            n = conn.recv_into(view)
            if n == 0:
                return False
            view = view[n:]
        return True

    head = memoryview(bytearray(HEADER.size))
    while read_exact(head):
        meta_len, data_len, final = HEADER.unpack(head)
        meta = bytearray(meta_len)
        read_exact(memoryview(meta))
        json.loads(meta)
        read_exact(buf[:data_len])
        if final:
            conn.sendall(b"\x01")


def child_tcp_send(args) -> None:
    host, port = args.address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    cache = PayloadCache()
    for line in sys.stdin:
        cmd = json.loads(line)
        stages = with_request_id(cache.get(cmd["tokens"], cmd["stage_blocks"]), cmd["rid"])
        t0 = time.perf_counter()
        for stage in stages:
            meta = json.dumps(stage.meta()).encode()
            sock.sendall(HEADER.pack(len(meta), len(stage.data), stage.is_final) + meta)
            sock.sendall(stage.data)
        if sock.recv(1) != b"\x01":
            raise RuntimeError("tcp receiver closed")
        reply({"seconds": time.perf_counter() - t0, "bytes": sum(len(s.data) for s in stages)})
    sock.close()


CHILDREN = {"grpc-recv": child_grpc_recv, "grpc-send": child_grpc_send,
            "tcp-recv": child_tcp_recv, "tcp-send": child_tcp_send}


class Child:
    """A child process of this script speaking JSON lines on stdin/stdout."""

    def __init__(self, role: str, extra: list[str], env: dict[str, str]) -> None:
        self.role = role
        self.proc = subprocess.Popen([sys.executable, __file__, "--child", role, *extra], cwd=ROOT,
                                     env={**os.environ, **env}, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.role} exited with {self.proc.wait()}")
        return json.loads(line)

    def call(self, cmd: dict) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def peak_rss_mib(self) -> float | None:
        return vm_hwm_mib(self.proc.pid)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def vm_hwm_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def self_peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- part 1 -------------------------------------------------------------------------------------
def malloc_env(args) -> dict[str, str]:
    env = dict(MALLOC_ENV[args.malloc])
    if "GLIBC_TUNABLES" in env and os.environ.get("GLIBC_TUNABLES"):
        env["GLIBC_TUNABLES"] = os.environ["GLIBC_TUNABLES"] + ":" + env["GLIBC_TUNABLES"]
    for item in args.child_env:
        k, _, v = item.partition("=")
        env[k] = v
    return env


def run_throughput(args) -> dict:
    names = args.cases.split(",") if args.cases else QUICK_CASES if args.quick else CASES
    cases = [(name, *ALL_CASES[name]) for name in names]
    repeats = args.repeats or (2 if args.quick else 5)
    env = malloc_env(args)
    max_bytes = max(-(-t // 16) * BLOCK_BYTES for _, t, _ in cases)
    common = ["--chunk-bytes", str(args.chunk_bytes), "--grpc-options", args.grpc_options]
    grpc_recv = Child("grpc-recv", common, env)
    tcp_recv = Child("tcp-recv", [*common, "--max-bytes", str(max_bytes)], env)
    children = [grpc_recv, tcp_recv]
    try:
        gport, tport = grpc_recv.read()["port"], tcp_recv.read()["port"]
        grpc_send = Child("grpc-send", [*common, "--address", f"127.0.0.1:{gport}"], env)
        tcp_send = Child("tcp-send", [*common, "--address", f"127.0.0.1:{tport}"], env)
        children += [grpc_send, tcp_send]
        pairs = {"grpc": (grpc_send, grpc_recv), "tcp": (tcp_send, tcp_recv)}
        rows = []
        n = 0
        for name, tokens, stage_blocks in cases:
            runs: dict[str, list[dict]] = {"grpc": [], "tcp": []}
            for rep in range(repeats + 1):                       # rep 0: warm-up (not counted)
                order = ("grpc", "tcp") if rep % 2 else ("tcp", "grpc")
                for kind in order:
                    n += 1
                    sender, receiver = pairs[kind]
                    cpu0 = [cpu_seconds(c.proc.pid) for c in (sender, receiver)]
                    r = sender.call({"tokens": tokens, "stage_blocks": stage_blocks, "rid": f"r{n}"})
                    time.sleep(0.02)          # the receiver's last bookkeeping after its reply
                    cpu1 = [cpu_seconds(c.proc.pid) for c in (sender, receiver)]
                    r["cpu_send"], r["cpu_recv"] = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
                    if rep:
                        runs[kind].append(r)
            rows.append(summarize(name, tokens, stage_blocks, runs))
            print_row(rows[-1], first=len(rows) == 1)
        peaks = {c.role: c.peak_rss_mib() for c in children}
    finally:
        for c in reversed(children):          # senders first
            c.close()
    total = {k: sum(r[k]["total_bytes"] for r in rows) / sum(r[k]["total_seconds"] for r in rows) / 1e9
             for k in ("grpc", "tcp")}
    cpu = {k: sum(r[k][f"cpu_s_per_gb_{e}"] * r[k]["total_bytes"] for r in rows for e in ("send", "recv"))
           / sum(r[k]["total_bytes"] for r in rows) for k in ("grpc", "tcp")}
    result = {"cases": rows, "repeats": repeats, "chunk_bytes": rows[0]["chunk_bytes"],
              "child_env": env, "grpc_options": current_grpc_options(args.grpc_options),
              "overall": {"grpc_gbps": total["grpc"], "tcp_gbps": total["tcp"],
                          "grpc_cpu_s_per_gb": cpu["grpc"], "tcp_cpu_s_per_gb": cpu["tcp"],
                          "ratio": total["grpc"] / total["tcp"],
                          "median_case_ratio": statistics.median(r["ratio"] for r in rows)},
              "peak_rss_mib": peaks}
    print(f"overall (all timed runs): gRPC {total['grpc']:.2f} GB/s, TCP {total['tcp']:.2f} GB/s, "
          f"ratio {total['grpc'] / total['tcp']:.0%}; CPU s/GB gRPC {cpu['grpc']:.2f} TCP {cpu['tcp']:.2f}; "
          "peak RSS MiB: "
          + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items() if v))
    return result


def current_grpc_options(spec: str) -> dict:
    from services.common import grpc_util
    apply_grpc_options(spec)
    return dict(grpc_util.OPTIONS)


def summarize(name: str, tokens: int, stage_blocks: int, runs: dict[str, list[dict]]) -> dict:
    num_blocks = -(-tokens // 16)
    row: dict = {"payload": name, "tokens": tokens, "bytes": runs["grpc"][0]["bytes"],
                 "chunk_bytes": runs["grpc"][0]["chunk_bytes"],
                 "stages": -(-num_blocks // (stage_blocks or num_blocks))}
    for kind, rs in runs.items():
        gbps = [r["bytes"] / r["seconds"] / 1e9 for r in rs]
        ms = [r["seconds"] * 1e3 for r in rs]
        row[kind] = {"gbps_median": statistics.median(gbps), "gbps_all": gbps,
                     "latency_ms_median": statistics.median(ms), "latency_ms_all": ms,
                     "total_bytes": sum(r["bytes"] for r in rs), "total_seconds": sum(r["seconds"] for r in rs),
                     # CPU seconds per GB moved, all threads of each end (less noisy than wall time)
                     "cpu_s_per_gb_send": sum(r["cpu_send"] for r in rs) / sum(r["bytes"] for r in rs) * 1e9,
                     "cpu_s_per_gb_recv": sum(r["cpu_recv"] for r in rs) / sum(r["bytes"] for r in rs) * 1e9}
    row["ratio"] = row["grpc"]["gbps_median"] / row["tcp"]["gbps_median"]
    return row


def print_row(r: dict, first: bool) -> None:
    if first:
        print("| payload | MB | stages | gRPC GB/s | TCP GB/s | gRPC/TCP | gRPC ms | TCP ms "
              "| CPU s/GB gRPC send+recv | TCP send+recv |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    g, t = r["grpc"], r["tcp"]
    print(f"| {r['payload']} | {r['bytes'] / 1e6:.0f} | {r['stages']} | {g['gbps_median']:.2f} | "
          f"{t['gbps_median']:.2f} | {r['ratio']:.0%} | {g['latency_ms_median']:.0f} | "
          f"{t['latency_ms_median']:.0f} | {g['cpu_s_per_gb_send']:.2f}+{g['cpu_s_per_gb_recv']:.2f} | "
          f"{t['cpu_s_per_gb_send']:.2f}+{t['cpu_s_per_gb_recv']:.2f} |", flush=True)


# ---- part 2 -------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> dict[int, str]:
    """pid -> command line of every live process below `pid` (ferry up's children run in own sessions)."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parent[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    found, todo = {}, [pid]
    while todo:
        p = todo.pop()
        for child, ppid in parent.items():
            if ppid == p and child not in found:
                try:
                    found[child] = (Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
                                    .decode(errors="replace").strip())
                except OSError:
                    continue
                todo.append(child)
    return found


def service_name(cmdline: str) -> str:
    words = cmdline.split()
    if "serve" in words and words.index("serve") + 1 < len(words):
        return "worker" if "--role both" in cmdline else words[words.index("serve") + 1]
    return Path(words[0]).name if words else "?"


class UpStack:
    """`python -m services.cli up` as a subprocess; SIGINT and wait on exit, then check nothing is left."""

    def __init__(self, colocated: bool, log_dir: Path, env: dict[str, str], extra: list[str],
                 timeout: float = 300) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log = log_dir / "up.log"
        cmd = [sys.executable, "-m", "services.cli", "up", "--port", str(self.port), "--log-dir", str(log_dir),
               *extra, *(["--colocated"] if colocated else [])]
        self.proc = subprocess.Popen(cmd, cwd=ROOT,
                                     env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
                                     stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115
                                     start_new_session=True)
        self.children: dict[int, str] = {}
        try:
            self.model = self._wait(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait(self, timeout: float) -> str:
        import httpx
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"ferry up exited with {self.proc.returncode}:\n{tail}")
            try:
                r = httpx.get(f"{self.url}/v1/models", timeout=2)
                if r.status_code == 200 and r.json().get("data"):
                    self.children = descendants(self.proc.pid)
                    return r.json()["data"][0]["id"]
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"ferry up serves no model after {timeout:.0f} s (log: {self.log})")

    def per_service(self, read) -> dict[str, float]:
        """`read(pid)` of each process of the stack, by service name (VmHWM, CPU seconds)."""
        out: dict[str, float] = {}
        for pid, cmdline in sorted(descendants(self.proc.pid).items()):
            name = service_name(cmdline)
            try:
                value = read(pid)
            except OSError:
                continue
            if value is not None:
                key, i = name, 1
                while key in out:
                    i += 1
                    key = f"{name}-{i}"
                out[key] = value
        return out

    def stop(self) -> list[int]:
        """SIGINT `ferry up` and wait; returns the pids of its children that outlived it (then ended)."""
        self.children.update(descendants(self.proc.pid))
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        left = []
        deadline = time.monotonic() + 15
        for pid, cmdline in self.children.items():
            while alive(pid, cmdline) and time.monotonic() < deadline:
                time.sleep(0.1)
            if alive(pid, cmdline):
                left.append(pid)
                os.kill(pid, signal.SIGKILL)
        return left


def alive(pid: int, cmdline: str) -> bool:
    """The process is still there and is the same program (not a reused pid)."""
    try:
        now = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return now == cmdline and state != "Z"


def stream_completion(client, url: str, model: str, prompt: list[int], max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "stream": True, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    ttft, tokens, chunks = None, None, 0
    t0 = time.perf_counter()
    with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"/v1/completions answered {r.status_code}: {r.text[:500]}")
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                break
            obj = json.loads(data)
            if "error" in obj:
                raise RuntimeError(f"stream error: {obj['error']}")
            if obj.get("choices") and obj["choices"][0].get("text"):
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
    e2e = time.perf_counter() - t0
    tokens = tokens or chunks
    if ttft is None:
        raise RuntimeError("the stream carried no text")
    return {"ttft_s": ttft, "e2e_s": e2e, "output_tokens": tokens,
            "tpot_s": (e2e - ttft) / (tokens - 1) if tokens > 1 else None}


def random_prompt(seed: int, length: int) -> list[int]:
    import random
    rng = random.Random(seed)
    return [rng.randrange(100, 49000) for _ in range(length)]


def run_ttft(args) -> dict:
    lengths = [int(x) for x in args.prompt_lens.split(",")]
    n = args.requests or (2 if args.quick else 5)
    env = malloc_env(args)
    modes = [("disaggregated", False), ("colocated", True)]
    result: dict = {"requests": n, "max_tokens": args.max_tokens, "stack_env": env, "stack_args": args.stack_args,
                    "modes": {}, "rows": []}
    log_root = Path(tempfile.mkdtemp(prefix="kv-transfer-ttft-"))
    try:
        _run_ttft_modes(args, modes, lengths, n, env, log_root, result)
    finally:
        if not args.keep_logs:
            shutil.rmtree(log_root, ignore_errors=True)
    return result


def _run_ttft_modes(args, modes, lengths, n, env, log_root: Path, result: dict) -> None:
    import httpx
    for mode, colocated in modes:
        t_start = time.perf_counter()
        stack = UpStack(colocated, log_root / mode, env, shlex.split(args.stack_args))
        startup = time.perf_counter() - t_start
        runs: dict[int, list[dict]] = {}
        cpu: dict[int, dict[str, float]] = {}
        try:
            with httpx.Client(timeout=600) as client:
                for length in lengths:
                    stream_completion(client, stack.url, stack.model, random_prompt(-length, length),
                                      args.max_tokens)                                      # warm-up
                    cpu0 = stack.per_service(cpu_seconds)
                    runs[length] = [stream_completion(client, stack.url, stack.model,
                                                      random_prompt(length * 1000 + i, length), args.max_tokens)
                                    for i in range(n)]
                    cpu[length] = {k: (v - cpu0.get(k, 0.0)) / n for k, v in stack.per_service(cpu_seconds).items()}
            rss = stack.per_service(vm_hwm_mib)
            threads = stack.per_service(lambda pid: len(os.listdir(f"/proc/{pid}/task")))
        finally:
            left = stack.stop()
        result["modes"][mode] = {"startup_s": startup, "peak_rss_mib": rss, "processes_left": left,
                                 "threads": threads,
                                 "cpu_s_per_request": {str(k): v for k, v in cpu.items()},
                                 "log_dir": str(log_root / mode), "runs": {str(k): v for k, v in runs.items()}}
        for length, rs in runs.items():
            ttft = [r["ttft_s"] * 1e3 for r in rs]
            tpot = [r["tpot_s"] * 1e3 for r in rs if r["tpot_s"] is not None]
            e2e = [r["e2e_s"] * 1e3 for r in rs]
            result["rows"].append({"prompt": length, "mode": mode, "ttft_ms_median": statistics.median(ttft),
                                   "ttft_ms_mean": statistics.fmean(ttft), "tpot_ms_median": statistics.median(tpot),
                                   "e2e_ms_median": statistics.median(e2e)})
    by = {(r["prompt"], r["mode"]): r for r in result["rows"]}
    print("| prompt | mode | TTFT median ms | TTFT mean ms | TPOT median ms | E2E median ms | TTFT disagg/coloc |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in sorted(result["rows"], key=lambda r: (r["prompt"], r["mode"] != "disaggregated")):
        ratio = r["ttft_ms_median"] / by[(r["prompt"], "colocated")]["ttft_ms_median"]
        r["ttft_ratio_vs_colocated"] = ratio
        print(f"| {r['prompt']} | {r['mode']} | {r['ttft_ms_median']:.0f} | {r['ttft_ms_mean']:.0f} | "
              f"{r['tpot_ms_median']:.1f} | {r['e2e_ms_median']:.0f} | "
              f"{'' if r['mode'] == 'colocated' else f'{ratio:.2f}'} |")
    for mode, m in result["modes"].items():
        print(f"{mode}: peak RSS MiB " + ", ".join(f"{k} {v:.0f}" for k, v in m["peak_rss_mib"].items())
              + (f"; ended leftover pids {m['processes_left']}" if m["processes_left"] else ""))
        for length, per in m["cpu_s_per_request"].items():
            print(f"  {length}-token prompt, CPU s per request: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in per.items() if v >= 0.005))


# ---- main ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="throughput,ttft", help="comma list: throughput, ttft")
    p.add_argument("--repeats", type=int, default=0, help="timed runs per case (default 5, quick 2)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--quick", action="store_true", help="small and few runs (CI smoke)")
    p.add_argument("--cases", default="", help=f"throughput payloads, comma list of {', '.join(ALL_CASES)} "
                   f"(default {','.join(CASES)}; --quick: {','.join(QUICK_CASES)})")
    t = p.add_argument_group("ttft")
    t.add_argument("--prompt-lens", default="1024,4096", help="prompt lengths in tokens")
    t.add_argument("--keep-logs", action="store_true", help="keep the stacks' logs (default: removed at the end)")
    t.add_argument("--requests", type=int, default=0, help="timed requests per length and mode (default 5)")
    t.add_argument("--max-tokens", type=int, default=16)
    t.add_argument("--stack-args", default="", help="extra `ferry up` options for both stacks, e.g. "
                   "'--cpu-threads 2' (by default ferry up splits the cores among its CPU workers)")
    g = p.add_argument_group("throughput knobs (to measure each lever)")
    g.add_argument("--chunk-bytes", type=int, default=0,
                   help="data bytes per KVChunk (≤ 4 MiB; default: stage_chunks' own, kv_stream.CHUNK_BYTES)")
    g.add_argument("--malloc", choices=tuple(MALLOC_ENV), default="tuned",
                   help="glibc malloc env of every child (both parts): tuned = "
                   + " ".join(f"{k}={v}" for k, v in MALLOC_ENV["tuned"].items()))
    g.add_argument("--child-env", action="append", default=[], metavar="K=V", help="extra env of the children")
    g.add_argument("--grpc-options", default="", metavar="NAME=INT,...",
                   help="override grpc_util.OPTIONS in the children (NAME=- drops one)")
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--address", help=argparse.SUPPRESS)
    p.add_argument("--max-bytes", type=int, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        apply_grpc_options(args.grpc_options)
        CHILDREN[args.child](args)
        return 0
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - {"throughput", "ttft"}
    if unknown:
        print(f"unknown part(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    out: dict = {"argv": sys.argv[1:], "quick": args.quick, "cpus": os.cpu_count()}
    if "throughput" in parts:
        out["throughput"] = run_throughput(args)
    if "ttft" in parts:
        out["ttft"] = run_ttft(args)
    out["peak_rss_mib"] = self_peak_rss_mib()
    print(f"peak RSS of this process: {out['peak_rss_mib']:.0f} MiB")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
