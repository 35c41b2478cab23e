"""Hostile gRPC messages to every service of a running stack (scheduler, prefill and decode workers,
kvstore, the gateway's TokenSink): bytes that are no protobuf, messages that make no sense, and
messages over the size limit get INVALID_ARGUMENT / RESOURCE_EXHAUSTED / NOT_FOUND /
FAILED_PRECONDITION — never UNKNOWN or INTERNAL (an exception the servicer did not handle), never a
hang, and every service still serves afterwards.
"""
from __future__ import annotations

import math

import grpc
import pytest

from services.common.grpc_util import MAX_MESSAGE_BYTES
from services.gen.ferry.v1 import (
    common_pb2,
    kvstore_pb2,
    scheduler_pb2,
    token_sink_pb2,
    worker_pb2,
)
from tests.hostile.grpc_probe import MALFORMED, REFUSALS, call, message_call
from tests.integration.stack import MODEL

pytestmark = pytest.mark.integration

OK = grpc.StatusCode.OK
# (service fixture key, method path, kind)
METHODS = [
    ("scheduler", "/ferry.v1.Scheduler/Register", "unary"),
    ("scheduler", "/ferry.v1.Scheduler/Heartbeat", "unary"),
    ("scheduler", "/ferry.v1.Scheduler/Deregister", "unary"),
    ("scheduler", "/ferry.v1.Scheduler/Route", "unary"),
    ("scheduler", "/ferry.v1.Scheduler/ListInstances", "unary"),
    ("scheduler", "/ferry.v1.Scheduler/DrainInstance", "unary"),
    ("scheduler", "/ferry.v1.Scheduler/NotifyPreemption", "unary"),
    ("scheduler", "/ferry.v1.Scheduler/GetScaleRecommendations", "unary"),
    ("prefill", "/ferry.v1.Worker/Prefill", "unary"),
    ("decode", "/ferry.v1.Worker/Admit", "unary"),
    ("decode", "/ferry.v1.Worker/PushKV", "bidi"),
    ("decode", "/ferry.v1.Worker/Migrate", "unary"),
    ("decode", "/ferry.v1.Worker/Abort", "unary"),
    ("decode", "/ferry.v1.Worker/Drain", "unary"),
    ("decode", "/ferry.v1.Worker/Stats", "unary"),
    ("decode", "/ferry.v1.Worker/SetPowerCap", "unary"),
    ("kvstore", "/ferry.v1.KVStore/Put", "client_stream"),
    ("kvstore", "/ferry.v1.KVStore/Get", "server_stream"),
    ("kvstore", "/ferry.v1.KVStore/Lookup", "unary"),
    ("kvstore", "/ferry.v1.KVStore/Evict", "unary"),
    ("kvstore", "/ferry.v1.KVStore/Stats", "unary"),
    ("sink", "/ferry.v1.TokenSink/Push", "client_stream"),
]


@pytest.fixture(scope="module")
def addresses(sim_stack, kvstore_address, sink_address, worker_addresses) -> dict[str, str]:
    return {"scheduler": sim_stack.scheduler_address, "kvstore": kvstore_address, "sink": sink_address,
            **worker_addresses}


def assert_refused(result, *codes: grpc.StatusCode) -> str:
    code, details, _ = result
    assert code in (codes or REFUSALS), (code, details)
    assert details, f"{code} without a message saying what is wrong"
    return details


@pytest.mark.parametrize("service,path,kind", METHODS, ids=[m[1].rsplit("/", 1)[1] + "-" + m[0] for m in METHODS])
def test_bytes_that_are_no_protobuf(addresses, service, path, kind):
    """grpcio parses before the servicer runs; services.common.grpc_guard turns its UNKNOWN into this."""
    for raw in MALFORMED:
        details = assert_refused(call(addresses[service], path, kind, [raw]), grpc.StatusCode.INVALID_ARGUMENT)
        assert "not a valid protobuf" in details, details


@pytest.mark.parametrize("service,path,kind", METHODS, ids=[m[1].rsplit("/", 1)[1] + "-" + m[0] for m in METHODS])
def test_messages_over_the_size_limit(addresses, service, path, kind):
    raw = b"\x0a" + _varint(MAX_MESSAGE_BYTES + 1) + b"x" * (MAX_MESSAGE_BYTES + 1)   # field 1, 64 MiB + 1
    assert_refused(call(addresses[service], path, kind, [raw]), grpc.StatusCode.RESOURCE_EXHAUSTED)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


# ---- semantically invalid messages ---------------------------------------------------------------
S = "/ferry.v1.Scheduler/"
W = "/ferry.v1.Worker/"
K = "/ferry.v1.KVStore/"
KEY = b"k" * 16


def sampling(**kw) -> common_pb2.SamplingOptions:
    return common_pb2.SamplingOptions(**{"max_tokens": 2, **kw})


def prefill(address_of, **kw) -> worker_pb2.PrefillRequest:
    fields = {"request_id": "hostile-p", "prompt_token_ids": [1, 2, 3], "sampling": sampling(),
              "sink_address": address_of["sink"], "decode_address": address_of["decode"], **kw}
    return worker_pb2.PrefillRequest(**fields)


SCHEDULER_CASES = [
    ("register-empty", "Register", common_pb2.Instance()),
    ("register-no-role", "Register", common_pb2.Instance(instance_id="x", address="127.0.0.1:1", model="m")),
    ("heartbeat-free-over-total", "Heartbeat", scheduler_pb2.HeartbeatRequest(
        instance_id="nobody", load=common_pb2.WorkerLoad(num_blocks=1, num_free_blocks=5))),
    ("heartbeat-request-without-id", "Heartbeat", scheduler_pb2.HeartbeatRequest(
        instance_id="nobody", load=common_pb2.WorkerLoad(requests=[common_pb2.RequestLoad()]))),
    ("route-empty", "Route", scheduler_pb2.RouteRequest()),
    ("route-no-prompt", "Route", scheduler_pb2.RouteRequest(request_id="r", model=MODEL)),
    ("route-short-key", "Route", scheduler_pb2.RouteRequest(request_id="r", model=MODEL, num_prompt_tokens=16,
                                                            block_keys=[b"abc"])),
    ("route-bad-priority", "Route", scheduler_pb2.RouteRequest(request_id="r", model=MODEL, num_prompt_tokens=1,
                                                               priority=77)),
    ("drain-unknown", "DrainInstance", scheduler_pb2.DrainInstanceRequest(instance_id="nobody")),
    ("preempt-empty", "NotifyPreemption", scheduler_pb2.PreemptionNotice()),
    ("preempt-nan-deadline", "NotifyPreemption", scheduler_pb2.PreemptionNotice(instance_id="nobody",
                                                                                deadline_unix_s=math.nan)),
    ("preempt-unknown", "NotifyPreemption", scheduler_pb2.PreemptionNotice(instance_id="nobody")),
]


@pytest.mark.parametrize("method,message", [c[1:] for c in SCHEDULER_CASES], ids=[c[0] for c in SCHEDULER_CASES])
def test_scheduler_refuses_nonsense(addresses, method, message):
    assert_refused(message_call(addresses["scheduler"], S + method, "unary", message))


def test_scheduler_route_to_an_unknown_model_or_absurd_sizes(addresses):
    for message in [scheduler_pb2.RouteRequest(request_id="r", model="no-such-model", num_prompt_tokens=5),
                    scheduler_pb2.RouteRequest(request_id="r", model=MODEL, num_prompt_tokens=2**32 - 1,
                                               max_tokens=2**32 - 1, block_keys=[KEY] * 10_000)]:
        code, details, _ = message_call(addresses["scheduler"], S + "Route", "unary", message)
        assert code in REFUSALS | {grpc.StatusCode.UNAVAILABLE}, (code, details)
    code, _, _ = message_call(addresses["scheduler"], S + "Heartbeat", "unary",
                              scheduler_pb2.HeartbeatRequest(instance_id="nobody"))
    assert code == OK                       # known=false: the worker registers again


def worker_cases(a: dict[str, str]) -> list[tuple[str, str, str, object]]:
    """(id, role, method, message)."""
    return [
        ("prefill-empty", "prefill", "Prefill", worker_pb2.PrefillRequest()),
        ("prefill-no-tokens", "prefill", "Prefill", prefill(a, prompt_token_ids=[])),
        ("prefill-no-sink", "prefill", "Prefill", prefill(a, sink_address="")),
        ("prefill-no-decode-address", "prefill", "Prefill", prefill(a, decode_address="")),
        ("prefill-on-decode-worker", "decode", "Prefill", prefill(a)),
        ("prefill-token-beyond-vocab", "prefill", "Prefill", prefill(a, prompt_token_ids=[1, 2**32 - 1])),
        ("prefill-beyond-context", "prefill", "Prefill", prefill(a, prompt_token_ids=[1] * 9000)),
        ("prefill-max-tokens-beyond-context", "prefill", "Prefill", prefill(a, sampling=sampling(max_tokens=2**32 - 1))),
        ("prefill-zero-max-tokens", "prefill", "Prefill", prefill(a, sampling=sampling(max_tokens=0))),
        ("prefill-negative-temperature", "prefill", "Prefill", prefill(a, sampling=sampling(temperature=-1))),
        ("prefill-nan-temperature", "prefill", "Prefill", prefill(a, sampling=sampling(temperature=math.nan))),
        ("prefill-inf-top-p", "prefill", "Prefill", prefill(a, sampling=sampling(top_p=math.inf))),
        ("prefill-nan-top-p", "prefill", "Prefill", prefill(a, sampling=sampling(top_p=math.nan))),
        ("prefill-empty-stop", "prefill", "Prefill", prefill(a, sampling=sampling(stop=[""]))),
        ("prefill-bad-priority", "prefill", "Prefill", prefill(a, priority=99)),
        ("admit-empty", "decode", "Admit", worker_pb2.AdmitRequest()),
        ("admit-bad-priority", "decode", "Admit", worker_pb2.AdmitRequest(request_id="hostile-a", num_tokens=8,
                                                                         sink_address=a["sink"], priority=42)),
        ("admit-no-sink", "decode", "Admit", worker_pb2.AdmitRequest(request_id="hostile-a")),
        ("admit-too-big", "decode", "Admit", worker_pb2.AdmitRequest(request_id="hostile-a", sink_address=a["sink"],
                                                                    num_tokens=2**32 - 1)),
        ("admit-reserve-too-many", "decode", "Admit", worker_pb2.AdmitRequest(
            request_id="hostile-a", sink_address=a["sink"], num_tokens=10, reserve_blocks=2**32 - 1)),
        ("migrate-empty", "decode", "Migrate", worker_pb2.MigrateRequest()),
        ("migrate-unknown", "decode", "Migrate", worker_pb2.MigrateRequest(request_id="nobody",
                                                                          destination_address=a["prefill"])),
        ("migrate-to-itself", "decode", "Migrate", worker_pb2.MigrateRequest(request_id="nobody",
                                                                            destination_address=a["decode"])),
        ("power-negative", "decode", "SetPowerCap", worker_pb2.PowerCapRequest(clock_mhz=-5)),
        ("power-nan", "decode", "SetPowerCap", worker_pb2.PowerCapRequest(watts=math.nan)),
        ("power-inf", "decode", "SetPowerCap", worker_pb2.PowerCapRequest(clock_mhz=math.inf)),
    ]


WORKER_IDS = [c[0] for c in worker_cases({"sink": "", "decode": "", "prefill": ""})]


@pytest.mark.parametrize("case", WORKER_IDS)
def test_worker_refuses_nonsense(addresses, sim_stack, case):
    _, role, method, message = next(c for c in worker_cases(addresses) if c[0] == case)
    assert_refused(message_call(addresses[role], W + method, "unary", message))
    assert sim_stack.idle(), "a refused request leaves nothing behind on the workers"


def test_a_refused_prefill_leaves_nothing_admitted_on_the_decode_worker(addresses):
    """The prefill worker admits a request on the decode worker before its engine refuses it (token id
    beyond the vocabulary): the admission is withdrawn, so the request id is free again there."""
    refused = prefill(addresses, request_id="hostile-admitted", prompt_token_ids=[1, 60_000])
    assert_refused(message_call(addresses["prefill"], W + "Prefill", "unary", refused),
                   grpc.StatusCode.INVALID_ARGUMENT)
    admit = worker_pb2.AdmitRequest(request_id="hostile-admitted", sink_address=addresses["sink"], num_tokens=8)
    code, details, _ = message_call(addresses["decode"], W + "Admit", "unary", admit)
    assert code == OK, (code, details)
    message_call(addresses["decode"], W + "Abort", "unary", worker_pb2.AbortRequest(request_id="hostile-admitted"))


def test_a_non_finite_power_cap_is_refused_and_changes_nothing(addresses):
    def gpu() -> worker_pb2.GpuPower:
        _, _, replies = message_call(addresses["decode"], W + "Stats", "unary", worker_pb2.StatsRequest())
        return worker_pb2.WorkerStats.FromString(replies[0]).gpu
    before = gpu()
    for request in (worker_pb2.PowerCapRequest(watts=math.nan), worker_pb2.PowerCapRequest(clock_mhz=math.inf),
                    worker_pb2.PowerCapRequest(clock_mhz=-math.inf, watts=100)):
        assert_refused(message_call(addresses["decode"], W + "SetPowerCap", "unary", request),
                       grpc.StatusCode.INVALID_ARGUMENT)
    after = gpu()
    assert (after.clock_cap_mhz, after.power_limit_watts) == (before.clock_cap_mhz, before.power_limit_watts)
    assert math.isfinite(after.power_watts) and math.isfinite(after.clock_mhz)


def test_worker_abort_of_nothing(addresses):
    code, _, replies = message_call(addresses["decode"], W + "Abort", "unary", worker_pb2.AbortRequest())
    assert code == OK and worker_pb2.AbortReply.FromString(replies[0]).found is False


def kv_cases() -> list[tuple[str, str, str, list]]:
    put = [kvstore_pb2.KVBlock(namespace="ns", key=KEY, data=b"x")]
    return [
        ("put-no-namespace", "Put", "client_stream", [kvstore_pb2.KVBlock(key=KEY, data=b"x")]),
        ("put-short-key", "Put", "client_stream", [kvstore_pb2.KVBlock(namespace="ns", key=b"abc", data=b"x")]),
        ("put-long-key", "Put", "client_stream", [kvstore_pb2.KVBlock(namespace="ns", key=KEY * 2, data=b"x")]),
        ("put-no-data", "Put", "client_stream", [kvstore_pb2.KVBlock(namespace="ns", key=KEY)]),
        ("put-bad-second", "Put", "client_stream", put + [kvstore_pb2.KVBlock(namespace="ns", key=b"", data=b"x")]),
        ("get-no-namespace", "Get", "server_stream", [kvstore_pb2.BlockKeys(keys=[KEY])]),
        ("get-short-key", "Get", "server_stream", [kvstore_pb2.BlockKeys(namespace="ns", keys=[KEY, b"a"])]),
        ("lookup-short-key", "Lookup", "unary", [kvstore_pb2.BlockKeys(namespace="ns", keys=[b""])]),
        ("lookup-no-namespace", "Lookup", "unary", [kvstore_pb2.BlockKeys(keys=[KEY])]),
        ("evict-short-key", "Evict", "unary", [kvstore_pb2.BlockKeys(namespace="ns", keys=[b"x" * 15])]),
    ]


@pytest.mark.parametrize("method,kind,messages", [c[1:] for c in kv_cases()], ids=[c[0] for c in kv_cases()])
def test_kvstore_refuses_nonsense(addresses, method, kind, messages):
    assert_refused(message_call(addresses["kvstore"], K + method, kind, *messages))


def test_kvstore_absurd_counts(addresses):
    """100k keys in one Lookup/Get: answered (nothing is there), not a hang."""
    keys = kvstore_pb2.BlockKeys(namespace="ns-absurd", keys=[i.to_bytes(16, "little") for i in range(100_000)])
    for method, kind in (("Lookup", "unary"), ("Get", "server_stream"), ("Evict", "unary")):
        code, details, _ = message_call(addresses["kvstore"], K + method, kind, keys)
        assert code == OK, (method, code, details)


def test_token_sink_takes_events_for_unknown_requests(addresses):
    """Tokens for a request the gateway does not know (the client left) are dropped, whatever they hold."""
    batch = token_sink_pb2.TokenBatch(events=[
        token_sink_pb2.TokenEvent(request_id="nobody", index=2**32 - 1, token_ids=[2**32 - 1] * 1000,
                                  finish_reason="nonsense"),
        token_sink_pb2.TokenEvent()])
    code, details, _ = message_call(addresses["sink"], "/ferry.v1.TokenSink/Push", "client_stream", batch, batch)
    assert code == OK, (code, details)


def test_every_service_still_serves(sim_stack, addresses):
    import httpx
    with httpx.Client(base_url=f"{sim_stack.url}/v1", timeout=30) as http:
        r = http.post("/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 3})
        assert r.status_code == 200, r.text
    assert message_call(addresses["kvstore"], K + "Stats", "unary", kvstore_pb2.KVStoreStatsRequest())[0] == OK
    assert len(sim_stack.instances()) == 2
    sim_stack.check_alive()
    from tests.procs import eventually
    assert eventually(sim_stack.idle, timeout=10)


def test_junk_events_for_a_running_request_do_not_break_its_stream(sim_stack, addresses):
    """Events for a live request at positions it never reaches (an index of 2^32 - 1, token ids past
    the vocabulary, an unknown finish reason) are held, never emitted: the stream ends as it would."""
    import httpx
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 48, "stream": True, "seed": 3}
    with httpx.Client(base_url=f"{sim_stack.url}/v1", timeout=30) as http, \
            http.stream("POST", "/completions", json=body) as r:
        assert r.status_code == 200
        rid = r.headers["x-request-id"]
        junk = token_sink_pb2.TokenBatch(events=[
            token_sink_pb2.TokenEvent(request_id=rid, index=2**32 - 1, token_ids=[2**32 - 1] * 100),
            token_sink_pb2.TokenEvent(request_id=rid, index=10**6, finish_reason="nonsense")])
        code, details, _ = message_call(addresses["sink"], "/ferry.v1.TokenSink/Push", "client_stream", junk)
        assert code == OK, (code, details)
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert not any('"error"' in line for line in lines)
    assert '"finish_reason": "length"' in lines[-2]
