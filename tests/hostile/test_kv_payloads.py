"""KV payloads that do not fit: another model/dtype/block size/layer count, truncated or extra bytes,
counts that do not match the bytes, keys of the wrong length, metadata of the wrong types. Each is
refused with a message that says what is wrong (ValueError in process, INVALID_ARGUMENT on a PushKV
stream), and the receiving pool is as it was: its free block count is back, and a correct payload or
request afterwards still works.
"""
from __future__ import annotations

import dataclasses
import json

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.engine.config import EngineConfig
from services.engine.kv_transfer import KVLayout, KVPayload
from services.engine.sampling import SamplingParams
from services.engine.sim_engine import SimEngine, SimProfile
from services.gen.ferry.v1 import worker_pb2
from services.worker.kv_stream import stage_chunks
from tests.hostile.grpc_probe import message_call

PROFILE = "llama3-8b-h100"           # what tests.integration.stack runs sim workers with
VOCAB = 49152


def sim_payload(request_id: str, prompt_len: int = 40, max_tokens: int = 3) -> KVPayload:
    """A real payload from a sim engine like the stack's decode worker: one prefill step, then all its KV."""
    profile = dataclasses.replace(SimProfile.load(PROFILE), vocab_size=VOCAB)
    engine = SimEngine(EngineConfig(model="-"), profile, num_blocks=64)
    engine.add_request(request_id, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens, seed=1))
    engine.step()
    return engine.export_kv(request_id)


def relayout(meta: dict, **changes) -> tuple[dict, bytes]:
    """The header with another layout, and bytes of the right size for that layout (so the layout is
    what is wrong, not the byte count)."""
    meta = json.loads(json.dumps(meta))
    meta["layout"].update(changes)
    return meta, bytes(meta["num_blocks"] * KVLayout(**meta["layout"]).bytes_per_block)


def edit(meta: dict, **changes) -> dict:
    meta = json.loads(json.dumps(meta))
    for key, value in changes.items():
        if value is ...:
            meta.pop(key, None)
        else:
            meta[key] = value
    return meta


# (id, (meta, data) -> (meta, data), a word the refusal names)
MUTATIONS = [
    ("other-model", lambda m, d: relayout(m, model_id="another-model"), "model_id"),
    ("other-dtype", lambda m, d: relayout(m, dtype="bfloat16"), "dtype"),
    ("other-block-size", lambda m, d: relayout(m, block_size=32), "block"),
    ("other-num-layers", lambda m, d: relayout(m, num_layers=2), "num_layers"),
    ("other-num-heads", lambda m, d: relayout(m, num_kv_heads=8), "num_kv_heads"),
    ("unknown-dtype", lambda m, d: (edit(m, layout={**m["layout"], "dtype": "int4"}), d), "dtype"),
    ("zero-block-size", lambda m, d: (edit(m, layout={**m["layout"], "block_size": 0}), d), "block_size"),
    ("layout-not-an-object", lambda m, d: (edit(m, layout=[1, 2]), d), "metadata"),
    ("truncated-by-one", lambda m, d: (m, d[:-1]), "truncated"),
    ("truncated-to-half", lambda m, d: (m, d[:len(d) // 2]), "truncated"),
    ("no-bytes", lambda m, d: (m, b""), "truncated"),
    ("one-byte-too-many", lambda m, d: (m, d + b"\0"), "too long"),
    ("count-above-bytes", lambda m, d: (edit(m, num_blocks=m["num_blocks"] + 1), d), "truncated"),
    ("count-below-bytes", lambda m, d: (edit(m, num_blocks=m["num_blocks"] - 1), d), "too long"),
    ("count-as-float", lambda m, d: (edit(m, num_blocks=float(m["num_blocks"])), d), "integer"),
    ("negative-first-block", lambda m, d: (edit(m, first_block=-1), d), "outside"),
    ("short-block-key", lambda m, d: (edit(m, block_keys=["ab"] * len(m["block_keys"])), d), "block keys"),
    ("block-key-not-hex", lambda m, d: (edit(m, block_keys=["zz" * 16] * len(m["block_keys"])), d), "hex"),
    ("more-keys-than-blocks", lambda m, d: (edit(m, block_keys=m["block_keys"] * 2), d), "keys"),
    ("computed-beyond-tokens", lambda m, d: (edit(m, num_computed_tokens=10_000), d), "num_computed_tokens"),
    ("no-prompt", lambda m, d: (edit(m, num_prompt_tokens=0), d), "num_prompt_tokens"),
    ("token-ids-not-base64", lambda m, d: (edit(m, token_ids_b64="***"), d), "metadata"),
    ("token-ids-odd-bytes", lambda m, d: (edit(m, token_ids_b64="AAAAAAA="), d), "uint32"),
    ("params-not-an-object", lambda m, d: (edit(m, params=5), d), "params"),
    ("params-top-k-float", lambda m, d: (edit(m, params={**m["params"], "top_k": 2.5}), d), "top_k"),
    ("params-seed-string", lambda m, d: (edit(m, params={**m["params"], "seed": "x"}), d), "seed"),
    ("params-unknown-field", lambda m, d: (edit(m, params={**m["params"], "beam": 4}), d), "beam"),
    ("params-nan-temperature", lambda m, d: (edit(m, params={**m["params"], "temperature": float("nan")}), d),
     "temperature"),
    ("missing-layout", lambda m, d: (edit(m, layout=...), d), "layout"),
    ("unknown-field", lambda m, d: (edit(m, color="blue"), d), "color"),
]


@pytest.fixture(scope="module")
def good() -> KVPayload:
    return sim_payload("hostile-kv")


@pytest.mark.parametrize("mutate,word", [m[1:] for m in MUTATIONS], ids=[m[0] for m in MUTATIONS])
def test_payload_that_does_not_fit_is_refused_in_process(good, mutate, word):
    meta, data = mutate(good.meta(), bytes(good.data))
    with pytest.raises(ValueError, match=None) as info:
        payload = KVPayload.from_chunks(meta, [data])
        payload.layout.check(good.layout)          # what import_kv checks first
    assert word.lower() in str(info.value).lower(), str(info.value)


def test_the_good_payload_round_trips(good):
    again = KVPayload.decode(good.encode())
    assert again.meta() == good.meta() and bytes(again.data) == bytes(good.data)


@settings(max_examples=300, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_any_corruption_of_an_encoded_payload_is_a_value_error(good, data):
    """Flip, cut or splice bytes of an encoded payload: decoding it gives a payload or a ValueError,
    never another exception."""
    raw = bytearray(good.encode())
    for _ in range(data.draw(st.integers(1, 4))):
        how = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        at = data.draw(st.integers(0, max(0, len(raw) - 1)))
        if how == "flip" and raw:
            raw[at] ^= data.draw(st.integers(1, 255))
        elif how == "cut":
            del raw[at:at + data.draw(st.integers(1, 64))]
        else:
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    try:
        KVPayload.decode(bytes(raw))
    except ValueError:
        pass


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                        max_size=3), max_leaves=8)


@settings(max_examples=300, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_any_header_field_of_any_type_is_a_value_error(good, data):
    meta = good.meta()
    for key in data.draw(st.lists(st.sampled_from(sorted(meta)), min_size=1, max_size=3, unique=True)):
        meta[key] = data.draw(json_values)
    for section in ("layout", "params"):
        if isinstance(meta.get(section), dict) and data.draw(st.booleans()):
            sub = data.draw(st.sampled_from(sorted(meta[section]) or ["x"]))
            meta[section] = {**meta[section], sub: data.draw(json_values)}
    try:
        KVPayload.from_chunks(json.loads(json.dumps(meta)), [bytes(good.data)])
    except ValueError:
        pass


# ---- over gRPC: a sim decode worker of a running stack ---------------------------------------------
W = "/ferry.v1.Worker/"


def free_blocks(address: str) -> int:
    _, _, replies = message_call(address, W + "Stats", "unary", worker_pb2.StatsRequest())
    return worker_pb2.WorkerStats.FromString(replies[0]).load.num_free_blocks


def admit(address: str, sink: str, request_id: str) -> None:
    code, details, _ = message_call(address, W + "Admit", "unary", worker_pb2.AdmitRequest(
        request_id=request_id, sink_address=sink, num_tokens=64))
    assert code == grpc.StatusCode.OK, details


def push(address: str, chunks: list[worker_pb2.KVChunk]):
    code, details, replies = message_call(address, W + "PushKV", "bidi", *chunks)
    return code, details, [worker_pb2.PushKVReply.FromString(r) for r in replies]


def one_stage(request_id: str, meta: dict | str, data: bytes) -> list[worker_pb2.KVChunk]:
    header = meta if isinstance(meta, str) else json.dumps(meta)
    return [worker_pb2.KVChunk(request_id=request_id, header_json=header, data=data, end_of_stage=True)]


STREAM_CASES = [
    ("no-header", lambda rid, m, d: [worker_pb2.KVChunk(request_id=rid, data=d, end_of_stage=True)], "header"),
    ("header-not-json", lambda rid, m, d: one_stage(rid, "{not json", d), "json"),
    ("header-a-list", lambda rid, m, d: one_stage(rid, "[1, 2]", d), "object"),
    ("header-nested-deep", lambda rid, m, d: one_stage(rid, "[" * 100_000, d), "json"),
    ("header-other-request", lambda rid, m, d: one_stage(rid, edit(m, request_id="someone-else"), d), "someone-else"),
    ("two-requests-one-stream", lambda rid, m, d: one_stage(rid, m, d[:-1])[:0]
     + [worker_pb2.KVChunk(request_id=rid, header_json=json.dumps(m), data=d[:10]),
        worker_pb2.KVChunk(request_id="other", data=d[10:], end_of_stage=True)], "one request"),
    ("ends-mid-stage", lambda rid, m, d: [worker_pb2.KVChunk(request_id=rid, header_json=json.dumps(m), data=d)],
     "middle"),
    ("no-final-stage", lambda rid, m, d: one_stage(rid, edit(m, num_blocks=m["num_blocks"] - 1),
                                                   d[:len(d) - len(d) // m["num_blocks"]]), "final"),
    ("beyond-vocab", lambda rid, m, d: one_stage(rid, edit(m, token_ids_b64="//////" + "//"), d), ""),
    ("max-tokens-beyond-context", lambda rid, m, d: one_stage(
        rid, edit(m, params={**m["params"], "max_tokens": 10**9}), d), "context"),
] + [(name, lambda rid, m, d, f=f: one_stage(rid, *f(m, d)), word) for name, f, word in MUTATIONS]


@pytest.mark.integration
@pytest.mark.parametrize("build,word", [c[1:] for c in STREAM_CASES], ids=[c[0] for c in STREAM_CASES])
def test_pushkv_refuses_a_bad_payload_and_the_pool_is_untouched(worker_addresses, sink_address, build, word):
    decode = worker_addresses["decode"]
    rid = "hostile-push"
    payload = sim_payload(rid)
    before = free_blocks(decode)
    admit(decode, sink_address, rid)
    code, details, _ = push(decode, build(rid, payload.meta(), bytes(payload.data)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert word.lower() in details.lower(), details
    assert free_blocks(decode) == before
    # The request id is free again, and the correct payload imports and resumes.
    admit(decode, sink_address, rid)
    code, details, replies = push(decode, list(stage_chunks(payload)))
    assert code == grpc.StatusCode.OK and replies[-1].resumed, (code, details)
    from tests.procs import eventually
    assert eventually(lambda: free_blocks(decode) == before, timeout=10), "it finishes and frees its blocks"


@pytest.mark.integration
def test_pushkv_without_admit_is_a_failed_precondition(worker_addresses):
    payload = sim_payload("never-admitted")
    code, details, _ = push(worker_addresses["decode"], list(stage_chunks(payload)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "Admit" in details, (code, details)


# ---- the kvstore: blocks of the wrong size under a real namespace ---------------------------------
K = "/ferry.v1.KVStore/"


def namespace() -> str:
    """The sim workers' kvstore namespace (WorkerServicer.namespace)."""
    layout = sim_payload("ns").layout
    return "/".join(str(v) for v in (layout.model_id, layout.dtype, layout.block_size, layout.num_layers,
                                     layout.num_kv_heads, layout.head_dim))


@pytest.mark.integration
def test_a_wrong_size_block_in_the_kvstore_is_a_miss_not_a_failed_request(sim_stack, kvstore_address):
    """Someone Puts bytes of the wrong size under the keys of a prompt's blocks: a prefill of that prompt
    computes them instead of failing (it would reshape 10 bytes into a block)."""
    import httpx

    from services.common.block_keys import chain_keys
    from services.gen.ferry.v1 import kvstore_pb2
    from tests.integration.stack import MODEL
    from tests.procs import eventually

    ns, block_size = namespace(), sim_payload("bs").layout.block_size
    poisoned, clean = list(range(100, 140)), list(range(200, 240))
    blocks = [kvstore_pb2.KVBlock(namespace=ns, key=key, data=b"x" * 10) for key in chain_keys(poisoned, block_size)[:2]]
    assert message_call(kvstore_address, K + "Put", "client_stream", *blocks)[0] == grpc.StatusCode.OK
    with httpx.Client(base_url=f"{sim_stack.url}/v1", timeout=30) as http:
        for prompt in (poisoned, clean):
            r = http.post("/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 3})
            assert r.status_code == 200, r.text
    # The namespace above is the workers' one: the clean prompt's blocks land in the store under it.
    keys = kvstore_pb2.BlockKeys(namespace=ns, keys=chain_keys(clean, block_size)[:2])

    def stored() -> bool:
        _, _, replies = message_call(kvstore_address, K + "Lookup", "unary", keys)
        return kvstore_pb2.LookupReply.FromString(replies[0]).num_hit == 2
    assert eventually(stored, timeout=10)
