"""`ferry serve kvstore` as a real process on loopback, driven through `KVStoreClient`."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import urllib.request

import grpc
import pytest

from services.kvstore.client import KVStoreClient
from tests.procs import ROOT, eventually, free_port, start, stop, wait_for_port

pytestmark = pytest.mark.integration
MIB = 2**20


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def block(size: int = MIB) -> bytes:
    """Distinct bytes on each call."""
    return os.urandom(16) * (size // 16)


@pytest.fixture(scope="module")
def kvstore(tmp_path_factory):
    """A running store: 32 MiB of memory spilling to a 64 MiB disk tier, metrics on."""
    tmp = tmp_path_factory.mktemp("kvstore")
    port, metrics_port = free_port(), free_port()
    proc = start(["serve", "kvstore", "--port", str(port), "--capacity-gb", str(32 / 1024),
                  "--disk-dir", str(tmp / "disk"), "--disk-capacity-gb", str(64 / 1024),
                  "--metrics-port", str(metrics_port)], log=tmp / "kv.log")
    try:
        wait_for_port(port, proc, timeout=30)
        wait_for_port(metrics_port, proc, timeout=10)
        assert eventually(lambda: f"kvstore listening on 127.0.0.1:{port}" in (tmp / "kv.log").read_text())
        yield {"address": f"127.0.0.1:{port}", "metrics_port": metrics_port, "log": tmp / "kv.log"}
    finally:
        stop(proc)
    assert proc.returncode == 0, (tmp / "kv.log").read_text()


@pytest.fixture
async def client(kvstore):
    kv = KVStoreClient(kvstore["address"], timeout=30)
    yield kv
    await kv.close()


async def test_put_lookup_get_one_mib_blocks(client):
    ns = "test/put-get"
    blocks = [(key(i), block()) for i in range(8)]
    assert await client.put(ns, blocks) == (8, 0)
    assert await client.put(ns, blocks[:3]) == (0, 3)
    keys = [k for k, _ in blocks]
    assert await client.lookup(ns, keys) == 8
    assert await client.lookup(ns, keys[:5] + [key(999)] + keys[5:]) == 5
    assert await client.get(ns, keys) == [d for _, d in blocks]
    assert await client.get(ns, keys[:2] + [key(999)] + keys[2:]) == [d for _, d in blocks[:2]]
    assert await client.evict(ns, keys[4:]) == 4
    assert await client.lookup(ns, keys) == 4


async def test_blocks_spill_to_disk_and_come_back(client):
    ns = "test/spill"
    blocks = [(key(i), block()) for i in range(40)]  # 40 MiB > the 32 MiB memory budget
    assert await client.put(ns, blocks) == (40, 0)
    stats = await client.stats()
    assert stats.num_bytes <= stats.capacity_bytes == 32 * MIB
    assert stats.num_disk_blocks >= 8
    keys = [k for k, _ in blocks]
    assert await client.lookup(ns, keys) == 40
    assert await client.get(ns, keys[:4]) == [d for _, d in blocks[:4]]  # from disk, byte-exact
    await client.evict(ns, keys)


async def test_concurrent_puts_and_gets(client):
    ns = "test/concurrent"

    async def worker(w: int) -> None:
        mine = [(key(1000 * w + i), block(64 * 1024)) for i in range(6)]
        for start_at in range(0, 6, 2):
            assert await client.put(ns, mine[start_at:start_at + 2]) == (2, 0)
            got = await client.get(ns, [k for k, _ in mine[:start_at + 2]])
            assert got == [d for _, d in mine[:start_at + 2]]

    await asyncio.gather(*(worker(w) for w in range(24)))
    assert await client.lookup(ns, [key(1000 * 23 + i) for i in range(6)]) == 6


@pytest.mark.parametrize("namespace, keys, expected", [
    ("ns", [b"short"], "key 0 is 5 bytes: block keys must be exactly 16 bytes"),
    ("ns", [key(1), b"x" * 17], "key 1 is 17 bytes"),
    ("", [key(1)], "namespace is empty"),
])
async def test_bad_requests_say_what_to_fix(client, namespace, keys, expected):
    for call in (client.lookup, client.get, client.evict):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(namespace, keys)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert expected in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.put(namespace, [(k, b"data") for k in keys])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and expected in err.value.details()


async def test_oversized_block_is_refused(client):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.put("test/big", [(key(1), b"x" * (33 * MIB))])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "larger than the memory capacity" in err.value.details()


async def test_metrics_endpoint(client, kvstore):
    await client.put("test/metrics", [(key(1), b"abc")])
    await client.get("test/metrics", [key(1), key(2)])
    url = f"http://127.0.0.1:{kvstore['metrics_port']}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    for name in ("ferry_kvstore_blocks ", "ferry_kvstore_bytes ", "ferry_kvstore_capacity_bytes 3.3554432e+07",
                 "ferry_kvstore_hits_total ", "ferry_kvstore_misses_total ", "ferry_kvstore_evictions_total ",
                 "ferry_kvstore_disk_blocks ", 'ferry_kvstore_requests_total{method="Put"}'):
        assert name in text, name


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", "serve", "kvstore", *args], check=False,
                          cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_help_lists_the_settings():
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    for flag in ("--capacity-gb", "--disk-dir", "--disk-capacity-gb", "--metrics-port", "--port"):
        assert flag in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--capacity-gb", "-1"], "capacity_gb must be > 0"),
    (["--disk-dir", "/tmp/x"], "set --disk-capacity-gb"),
    (["--capacity-gb", "lots"], "cannot read 'lots' as float"),
])
def test_bad_settings_exit_with_a_clear_message(args, message):
    result = run_cli(*args)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
