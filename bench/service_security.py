"""What service security costs: gRPC between Ferry processes plaintext, with the shared token, with mutual
TLS and with both; and a gateway's rate-limit decision kept locally or in Redis (shared by replicas).

    .venv/bin/python bench/service_security.py --json bench/out/service_security.json     # ~1 min

gRPC: one server and one channel made by services/common/grpc_util.py (what every Ferry process uses),
in this process, the modes interleaved `--repeats` times (medians reported): a small unary call's round
trip (p50/p99, the Route/heartbeat shape) and a stream of 4 MiB messages (the KV-transfer shape, MB/s). Rate limits: one `take` of
rate_limit.LocalBuckets vs rate_limit_redis.RedisBuckets against a real redis-server on loopback.
Ratios against plaintext / local matter; absolute times are this machine's.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))                   # run as a script: `bench` and `services` importable

from bench.serving import free_port
from services.common import grpc_util, service_auth, service_tls

SMALL, LARGE = b"x" * 100, b"k" * (4 * 2**20)
MODES = {"plaintext": (False, False), "token": (True, False), "tls": (False, True), "token+tls": (True, True)}


def echo_handlers() -> grpc.GenericRpcHandler:
    async def unary(request, context):
        return request

    async def sink(requests, context):
        total = 0
        async for r in requests:
            total += len(r)
        return total.to_bytes(8, "little")

    return grpc.method_handlers_generic_handler("b.Echo", {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Sink": grpc.stream_unary_rpc_method_handler(sink)})


async def measure_grpc(calls: int, messages: int) -> dict:
    server = grpc_util.aio_server()
    server.add_generic_rpc_handlers((echo_handlers(),))
    port = grpc_util.bind(server, "127.0.0.1", 0)
    await server.start()
    try:
        async with grpc_util.aio_channel(f"127.0.0.1:{port}") as channel:
            unary, sink = channel.unary_unary("/b.Echo/Unary"), channel.stream_unary("/b.Echo/Sink")
            for _ in range(50):                                     # connect, handshake, warm up
                await unary(SMALL, timeout=10)
            times = []
            for _ in range(calls):
                start = time.perf_counter()
                await unary(SMALL, timeout=10)
                times.append(time.perf_counter() - start)
            start = time.perf_counter()
            got = await sink(iter([LARGE] * messages), timeout=120)
            elapsed = time.perf_counter() - start
        assert int.from_bytes(got, "little") == len(LARGE) * messages
    finally:
        await server.stop(None)
    q = statistics.quantiles(times, n=100)
    return {"unary_p50_us": q[49] * 1e6, "unary_p99_us": q[98] * 1e6,
            "stream_mb_per_s": len(LARGE) * messages / elapsed / 1e6}


def start_redis(folder: Path) -> tuple[subprocess.Popen, int]:
    """A real redis-server on loopback, listening."""
    port = free_port()
    redis = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
                              "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(folder)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return redis, port
        except OSError:
            time.sleep(0.05)
    redis.kill()
    raise RuntimeError("redis-server did not start")


async def measure_rate_limits(decisions: int, redis_port: int) -> dict:
    from services.gateway.rate_limit import LocalBuckets
    from services.gateway.rate_limit_redis import RedisBuckets

    shared = RedisBuckets(f"redis://127.0.0.1:{redis_port}/0")
    out = {}
    for name, buckets in (("local", LocalBuckets()), ("redis", shared)):
        for _ in range(100):
            await buckets.take(("warm", "requests"), 10**9, 1)
        times = []
        for i in range(decisions):
            start = time.perf_counter()
            decision = await buckets.take((f"key{i % 50}", "requests"), 10**9, 1)
            times.append(time.perf_counter() - start)
            assert decision.is_allowed
        q = statistics.quantiles(times, n=100)
        out[name] = {"take_p50_us": q[49] * 1e6, "take_p99_us": q[98] * 1e6}
    await shared.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="unary calls per mode")
    parser.add_argument("--messages", type=int, default=128, help="4 MiB messages streamed per mode")
    parser.add_argument("--decisions", type=int, default=5000, help="rate-limit decisions per kind")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each gRPC mode (medians are reported)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="ferry-bench-security-"))
    try:
        service_tls.create(folder / "tls")
        (folder / "token").write_text("bench-token-0123456789abcdef\n")
        runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for _ in range(args.repeats):                   # the modes interleaved: drift hits them alike
            for mode, (token, tls) in MODES.items():
                os.environ[service_auth.TOKEN_FILE_ENV] = str(folder / "token") if token else ""
                os.environ[service_tls.TLS_DIR_ENV] = str(folder / "tls") if tls else ""
                runs[mode].append(asyncio.run(measure_grpc(args.calls, args.messages)))
        grpc_results = {mode: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for mode, rs in runs.items()}
        os.environ[service_auth.TOKEN_FILE_ENV] = os.environ[service_tls.TLS_DIR_ENV] = ""
        redis, port = start_redis(folder)
        try:
            limits = asyncio.run(measure_rate_limits(args.decisions, port))
        finally:
            redis.terminate()
            redis.wait(10)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    base = grpc_results["plaintext"]
    print(f"{'gRPC':<11} {'unary p50':>10} {'p99':>9} {'x p50':>6} {'stream MB/s':>12} {'x':>6}")
    for mode, r in grpc_results.items():
        print(f"{mode:<11} {r['unary_p50_us']:>8.0f}us {r['unary_p99_us']:>7.0f}us "
              f"{r['unary_p50_us'] / base['unary_p50_us']:>6.2f} {r['stream_mb_per_s']:>12.0f} "
              f"{r['stream_mb_per_s'] / base['stream_mb_per_s']:>6.2f}")
    print(f"\n{'rate limit':<11} {'take p50':>10} {'p99':>9}")
    for name, r in limits.items():
        print(f"{name:<11} {r['take_p50_us']:>8.1f}us {r['take_p99_us']:>7.1f}us")
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS of this process (server, client, buffers): {peak_rss_mb:.0f} MB")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"grpc": grpc_results, "rate_limits": limits, "peak_rss_mb": peak_rss_mb,
                                         "args": {k: str(v) for k, v in vars(args).items()}}, indent=2))


if __name__ == "__main__":
    main()
