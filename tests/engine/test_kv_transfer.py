"""KV export/import on the real SmolLM2: a request moved to another engine (or another process)
continues with exactly the tokens it would have produced where it started.

    engine A:  prefill, decode N tokens --export_kv--> payload --encode/chunks--> bytes
    engine B:  import_kv(payload) --> decode the rest  ==  A's uninterrupted run

Multi-stage export sends full blocks while the request keeps decoding at the source, then the rest:

    stage 1:  blocks [0, k)          (full: they no longer change)    import_kv -> False (staged)
    stage 2:  blocks [k, end)        (current token ids)               import_kv -> True  (resumes)
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.engine.block_pool import OutOfBlocks
from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.kv_transfer import KVLayoutMismatch, KVPayload
from services.engine.sampling import SamplingParams
from services.engine.sequence import Sequence

pytestmark = pytest.mark.slow          # loads the real SmolLM2-135M

ROOT = Path(__file__).resolve().parents[2]
BLOCK_SIZE = 16                 # EngineConfig's default
NUM_BEFORE_EXPORT = 10
NUM_TOKENS = 40
GREEDY = SamplingParams(max_tokens=NUM_TOKENS, temperature=0, ignore_eos=True)
SAMPLED = SamplingParams(max_tokens=NUM_TOKENS, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)
MiB = 2**20
TEXTS = {
    "short": "The capital of France is",
    "medium": "A paged KV cache splits each request's keys and values into fixed-size blocks, so that",
    "dedup": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number, computed iteratively.\"\"\"\n"
             "    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n\ndef ",
    "long": " ".join([("Continuous batching lets a server add requests to a running batch between steps,"
                       " and chunked prefill lets long prompts share a step with short decodes.")] * 7),
}

RESUME_IN_FRESH_PROCESS = """
import json, sys
from pathlib import Path
from services.engine.block_pool import OutOfBlocks
from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.kv_transfer import KVPayload

model, payload_dir = sys.argv[1], Path(sys.argv[2])
engine = LLMEngine(EngineConfig(model=model, kv_cache_memory_gb=0.25))
outputs = {}
for path in sorted(payload_dir.glob("*.kv")):
    payload = KVPayload.decode(path.read_bytes())
    assert engine.import_kv(payload), "a whole-request payload must resume at once"
    outputs[payload.request_id] = list(payload.token_ids[payload.num_prompt_tokens:])
while engine.has_unfinished:
    for out in engine.step():
        outputs[out.request_id].extend(out.new_token_ids)
print(json.dumps(outputs))
"""


def make_engine(model_path, **overrides) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model_path), **{"kv_cache_memory_gb": 0.25, **overrides}))


@pytest.fixture(scope="module")
def engine_a(smollm2_path) -> LLMEngine:
    return make_engine(smollm2_path)


@pytest.fixture(scope="module")
def engine_b(smollm2_path) -> LLMEngine:
    return make_engine(smollm2_path)


@pytest.fixture(scope="module")
def prompts(engine_a) -> dict[str, list[int]]:
    return {name: engine_a.tokenizer(text).input_ids for name, text in TEXTS.items()}


@pytest.fixture(scope="module")
def kv_payload(engine_a, prompts) -> KVPayload:
    """A whole-request payload (medium prompt, 10 greedy tokens), exported once for the module."""
    start(engine_a, {"kv-fixture": (prompts["medium"], GREEDY)})
    payload = engine_a.export_kv("kv-fixture")
    engine_a.abort("kv-fixture")
    return payload


def start(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]],
          num_output: int = NUM_BEFORE_EXPORT) -> list[Sequence]:
    """Add requests together and step until each has `num_output` output tokens."""
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    return step_until(engine, list(requests), num_output)


def step_until(engine: LLMEngine, request_ids: list[str], num_output: int) -> list[Sequence]:
    seqs = [engine.seqs[r] for r in request_ids]
    while min(s.num_output_tokens for s in seqs) < num_output:
        engine.step()
    assert [s.num_output_tokens for s in seqs] == [num_output] * len(seqs)
    return seqs


def run_imported(engine: LLMEngine, payload: KVPayload) -> list[int]:
    """Step `engine` until the imported request ends; its whole output, tokens before the export included."""
    tokens = list(payload.token_ids[payload.num_prompt_tokens:])
    while payload.request_id in engine.seqs:
        for out in engine.step():
            if out.request_id == payload.request_id:
                tokens.extend(out.new_token_ids)
    return tokens


def pool_state(engine: LLMEngine) -> tuple:
    pool = engine.kv.pool
    return pool.num_free, tuple(pool.ref_counts), dict(pool.cached), sorted(engine.seqs)


# ---- (a) the done-criterion: resume in a fresh process --------------------------------------------
def test_kv_export_resumes_in_a_fresh_process_with_the_uninterrupted_tokens(engine_a, prompts, smollm2_path,
                                                                           tmp_path):
    requests = {"kv-greedy": (prompts["short"], GREEDY), "kv-sampled": (prompts["medium"], SAMPLED)}
    expected = dict(zip(requests, engine_a.generate([p for p, _ in requests.values()],
                                                    [params for _, params in requests.values()])))
    start(engine_a, requests)
    for request_id in requests:
        (tmp_path / f"{request_id}.kv").write_bytes(engine_a.export_kv(request_id).encode())
        engine_a.abort(request_id)

    result = subprocess.run([sys.executable, "-c", RESUME_IN_FRESH_PROCESS, str(smollm2_path), str(tmp_path)],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                            text=True, timeout=180, check=False)

    assert result.returncode == 0, result.stderr[-3000:]
    resumed = json.loads(result.stdout.strip().splitlines()[-1])
    assert resumed == expected
    assert all(len(tokens) == NUM_TOKENS for tokens in resumed.values())


# ---- (b) multi-stage export -------------------------------------------------------------------
def test_kv_multi_stage_import_resumes_only_after_the_final_stage(engine_a, engine_b, prompts):
    prompt = prompts["medium"]
    (expected,) = engine_a.generate([prompt], SAMPLED)
    (seq,) = start(engine_a, {"kv-stages": (prompt, SAMPLED)}, num_output=3)
    k = (seq.num_computed_tokens - 1) // BLOCK_SIZE        # full blocks only, short of the last one
    assert k >= 1

    first = engine_a.export_kv("kv-stages", slice(0, k))
    assert (first.first_block, first.num_blocks, first.is_final) == (0, k, False)
    assert engine_b.import_kv(first) is False
    assert "kv-stages" not in engine_b.seqs and not engine_b.has_unfinished

    step_until(engine_a, ["kv-stages"], 8)                  # the source keeps decoding meanwhile
    last = engine_a.export_kv("kv-stages", slice(k, None))
    assert (last.first_block, last.is_final) == (k, True)
    assert last.token_ids == tuple(seq.token_ids) and last.num_computed_tokens == seq.num_computed_tokens
    engine_a.abort("kv-stages")
    assert engine_b.import_kv(last) is True

    assert run_imported(engine_b, last) == expected


# ---- (c) streaming ----------------------------------------------------------------------------
def test_kv_payload_streams_in_chunks_of_at_most_4_mib_and_round_trips(engine_a, prompts):
    start(engine_a, {"kv-chunks": (prompts["long"], GREEDY)}, num_output=1)
    payload = engine_a.export_kv("kv-chunks")
    engine_a.abort("kv-chunks")
    assert len(payload.data) > 4 * MiB, "the payload should need more than one chunk"

    chunks = list(payload.chunks(max_bytes=4 * MiB))

    assert all(len(c) <= 4 * MiB for c in chunks)
    assert len(chunks) == -(-len(payload.data) // (4 * MiB))
    meta = json.loads(json.dumps(payload.meta()))           # the metadata travels as JSON
    assert KVPayload.from_chunks(meta, chunks) == payload
    assert KVPayload.decode(payload.encode()) == payload


@pytest.mark.parametrize("cut", ["last chunk", "one byte"])
def test_kv_payload_from_truncated_chunks_raises(kv_payload, cut):
    chunks = list(kv_payload.chunks(max_bytes=MiB))
    chunks = chunks[:-1] if cut == "last chunk" else chunks[:-1] + [chunks[-1][:-1]]
    with pytest.raises(ValueError, match="truncated"):
        KVPayload.from_chunks(kv_payload.meta(), chunks)


def test_kv_payload_decode_of_truncated_bytes_raises(kv_payload):
    raw = kv_payload.encode()
    for cut in (raw[:2], raw[:-1]):
        with pytest.raises(ValueError, match="truncated"):
            KVPayload.decode(cut)


# ---- (d) layout mismatch ----------------------------------------------------------------------
@pytest.mark.parametrize("model, overrides, field", [
    ("smollm2", {"block_size": 32}, "block_size"),
    ("smollm2", {"dtype": "bfloat16"}, "dtype"),
    ("tiny", {}, "model_id"),
    ("tiny", {"model_id": "SmolLM2-135M-Instruct"}, "num_layers"),   # another model under the same name
])
def test_kv_import_with_a_mismatched_layout_names_the_field(smollm2_path, tiny_llama, kv_payload, model,
                                                           overrides, field):
    path = smollm2_path if model == "smollm2" else tiny_llama
    engine = make_engine(path, **{"kv_cache_memory_gb": 0.02, **overrides})
    before = pool_state(engine)
    with pytest.raises(KVLayoutMismatch, match=f"payload has {field}=.*this engine has {field}="):
        engine.import_kv(kv_payload)
    assert pool_state(engine) == before


# ---- (e) a rejected import changes nothing -----------------------------------------------------
def reject_for_lack_of_blocks(engine: LLMEngine, payload: KVPayload) -> tuple[KVPayload, list[int]]:
    """Hold all but num_blocks - 1 free blocks (as other requests would), so the payload cannot fit."""
    held = engine.kv.pool.allocate(engine.kv.num_free_blocks - payload.num_blocks + 1)
    return payload, held


def reject_out_of_order(engine: LLMEngine, payload: KVPayload) -> tuple[KVPayload, list[int]]:
    """A later stage (blocks from 1 on) arriving before the first."""
    whole = payload.blocks()
    later = dataclasses.replace(payload, first_block=1, num_blocks=payload.num_blocks - 1,
                                block_keys=payload.block_keys[1:], data=whole[1:].numpy().tobytes())
    return later, []


def reject_token_outside_vocab(engine: LLMEngine, payload: KVPayload) -> tuple[KVPayload, list[int]]:
    bad = payload.token_ids[:-1] + (engine.vocab_size,)
    return dataclasses.replace(payload, token_ids=bad), []


REJECTIONS = {
    "not enough free blocks": (reject_for_lack_of_blocks, OutOfBlocks, "free KV blocks needed"),
    "blocks out of order": (reject_out_of_order, ValueError, "out of order"),
    "token outside the vocabulary": (reject_token_outside_vocab, ValueError, "outside the vocabulary"),
}


@pytest.mark.parametrize("make_rejected, error, message", REJECTIONS.values(), ids=REJECTIONS)
def test_kv_rejected_import_leaves_the_pool_unchanged_and_a_later_import_works(engine_b, kv_payload,
                                                                              make_rejected, error, message):
    rejected, held = make_rejected(engine_b, kv_payload)
    before = pool_state(engine_b)
    with pytest.raises(error, match=message):
        engine_b.import_kv(rejected)
    assert pool_state(engine_b) == before
    engine_b.kv.pool.free(held)

    assert engine_b.import_kv(kv_payload) is True
    assert engine_b.seqs[kv_payload.request_id].num_computed_tokens == kv_payload.num_computed_tokens
    engine_b.abort(kv_payload.request_id)


@pytest.mark.parametrize("make_rejected, error, message", REJECTIONS.values(), ids=REJECTIONS)
def test_kv_rejected_import_leaves_the_request_id_free(engine_b, kv_payload, prompts, make_rejected, error,
                                                      message):
    rejected, held = make_rejected(engine_b, kv_payload)
    with pytest.raises(error, match=message):
        engine_b.import_kv(rejected)
    engine_b.kv.pool.free(held)
    try:
        engine_b.add_request(kv_payload.request_id, prompts["short"], GREEDY)   # fall back to recompute
    finally:
        engine_b.abort(kv_payload.request_id)


# ---- (f) dedup against the prefix cache ------------------------------------------------------
def test_kv_import_shares_blocks_whose_keys_are_cached_already(engine_a, engine_b, prompts):
    prompt = prompts["dedup"]
    num_shared = len(prompt) // BLOCK_SIZE
    assert num_shared >= 2
    (expected,) = engine_a.generate([prompt], GREEDY)
    (holder,) = start(engine_b, {"kv-holder": (prompt, GREEDY)}, num_output=1)   # B computed the prompt
    start(engine_a, {"kv-dedup": (prompt, GREEDY)})
    payload = engine_a.export_kv("kv-dedup")
    engine_a.abort("kv-dedup")
    free_before = engine_b.kv.num_free_blocks

    assert engine_b.import_kv(payload) is True

    assert free_before - engine_b.kv.num_free_blocks == payload.num_blocks - num_shared
    assert engine_b.seqs["kv-dedup"].block_ids[:num_shared] == holder.block_ids[:num_shared]
    engine_b.abort("kv-holder")
    assert run_imported(engine_b, payload) == expected
    assert engine_b.kv.num_free_blocks == engine_b.kv.pool.num_blocks
