"""The CUDA path: Triton paged decode attention, CUDA-graph decode steps, and KV moving between
a GPU engine and a CPU engine. Runs on the lent GPU machine (`pytest -m gpu`); skipped elsewhere."""
from __future__ import annotations

import pytest
import torch

from services.engine.attention import decode_attention_reference
from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.sampling import SamplingParams

pytestmark = pytest.mark.gpu
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
PROMPTS = [[1, 17, 400, 9000, 23], list(range(100, 160)), [5] * 33, list(range(2000, 2017)), [42]]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("batch,heads,kv_heads,head_dim,block_size,splits",
                         [(1, 32, 8, 128, 16, 16), (7, 9, 3, 64, 16, 4), (64, 32, 8, 128, 16, 1),
                          (3, 4, 4, 64, 8, 2)])
def test_triton_paged_decode_matches_reference(dtype, tol, batch, heads, kv_heads, head_dim, block_size, splits):
    from services.engine.triton_attention import paged_decode_attention
    gen = torch.Generator(device="cuda").manual_seed(batch)
    num_blocks = 200
    kv = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, device="cuda", generator=gen).to(dtype)
    q = torch.randn(batch, heads, head_dim, device="cuda", generator=gen).to(dtype)
    lens = torch.randint(1, 40 * block_size, (batch,), device="cuda", generator=gen).to(torch.int32)
    width = int(lens.max()) // block_size + 1
    tables = torch.stack([torch.randperm(num_blocks, device="cuda")[:width] for _ in range(batch)]).to(torch.int32)
    ref = decode_attention_reference(q.float(), kv.float(), tables, lens, head_dim ** -0.5)
    out = paged_decode_attention(q, kv, tables, lens, head_dim ** -0.5, splits).float()
    assert float((out - ref).norm() / ref.norm()) < tol


@pytest.fixture(scope="module")
def cpu_engine(tiny_llama):
    return LLMEngine(EngineConfig(model=str(tiny_llama), max_num_seqs=8))


@pytest.fixture(scope="module")
def gpu_engine(tiny_llama):
    return LLMEngine(EngineConfig(model=str(tiny_llama), device="cuda", max_num_seqs=8, num_blocks=512))


def test_engine_gpu_greedy_equals_cpu_with_cuda_graphs(cpu_engine, gpu_engine):
    assert gpu_engine.runner.graphs, "decode steps should replay CUDA graphs"
    assert gpu_engine.generate(PROMPTS, GREEDY) == cpu_engine.generate(PROMPTS, GREEDY)


def test_engine_gpu_prefix_cache_hits_equal_cpu(cpu_engine, gpu_engine):
    shared = list(range(700, 740))                       # two and a half blocks in common
    prompts = [shared + [1, 2, 3], shared + [4, 5, 6, 7, 8, 9]]
    gpu_engine.generate(prompts[:1], GREEDY)
    hits = gpu_engine.kv.num_hit_blocks
    assert gpu_engine.generate(prompts, GREEDY) == cpu_engine.generate(prompts, GREEDY)
    assert gpu_engine.kv.num_hit_blocks - hits >= 4


def test_engine_gpu_kv_export_continues_on_cpu(cpu_engine, gpu_engine):
    prompt = list(range(300, 345))
    expected = cpu_engine.generate([prompt], GREEDY)[0]
    gpu_engine.add_request("moving", prompt, GREEDY)
    while gpu_engine.seqs["moving"].num_output_tokens < 10:
        gpu_engine.step()
    payload = gpu_engine.export_kv("moving")
    gpu_engine.abort("moving")
    assert cpu_engine.import_kv(payload)
    tokens = list(payload.token_ids[len(prompt):])
    while cpu_engine.has_unfinished:
        tokens += [t for out in cpu_engine.step() for t in out.new_token_ids]
    assert tokens == expected


def test_engine_gpu_bfloat16_runs(tiny_llama):
    engine = LLMEngine(EngineConfig(model=str(tiny_llama), device="cuda", dtype="bfloat16", max_num_seqs=4,
                                       num_blocks=512))
    outputs = engine.generate(PROMPTS[:3], SamplingParams(max_tokens=8, temperature=0.7, seed=1))
    assert [len(o) for o in outputs] == [8, 8, 8]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_fused_ops_match_torch(dtype, tol):
    from services.engine import triton_ops
    from services.engine.attention import write_kv
    from services.engine.config import ModelConfig
    from services.engine.model import RotaryEmbedding

    def _rotate_half(x):
        return torch.cat((-x[..., x.shape[-1] // 2:], x[..., :x.shape[-1] // 2]), dim=-1)

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm())

    gen = torch.Generator(device="cuda").manual_seed(0)
    x, res = (torch.randn(37, 4096, device="cuda", generator=gen).to(dtype) for _ in range(2))
    w = torch.randn(4096, device="cuda", generator=gen).to(dtype)
    ref_res = x + res
    ref32 = ref_res.float()
    ref = w * (ref32 * torch.rsqrt(ref32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    res_inout = res.clone()
    assert rel(triton_ops.add_rms_norm(x, res_inout, w, 1e-5), ref) < tol
    assert rel(res_inout, ref_res) < tol

    gate_up = torch.randn(37, 2 * 1000, device="cuda", generator=gen).to(dtype)
    gate, up = gate_up.float().chunk(2, dim=-1)
    assert rel(triton_ops.silu_and_mul(gate_up), torch.nn.functional.silu(gate) * up) < tol

    cfg = ModelConfig.from_dict({"model_type": "llama", "vocab_size": 10, "hidden_size": 4096,
                                 "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 32,
                                 "num_key_value_heads": 8, "rope_theta": 500000.0})
    rope = RotaryEmbedding(cfg, 512).cuda()
    qkv = torch.randn(37, (32 + 16) * 128, device="cuda", generator=gen).to(dtype)
    q, k, v = qkv.split([32 * 128, 8 * 128, 8 * 128], dim=-1)
    q, k, v = q.view(-1, 32, 128), k.view(-1, 8, 128), v.view(-1, 8, 128)
    positions = torch.randint(0, 512, (37,), device="cuda", generator=gen)
    slots = torch.randperm(64 * 16, device="cuda")[:37]
    cos, sin = rope.cos[positions].unsqueeze(1), rope.sin[positions].unsqueeze(1)
    ref_q = q.float() * cos + _rotate_half(q.float()) * sin
    ref_k = k.float() * cos + _rotate_half(k.float()) * sin
    ref_cache = torch.zeros(2, 64, 16, 8, 128, device="cuda")
    write_kv(ref_cache, ref_k, v.float(), slots)
    cache = torch.zeros(2, 64, 16, 8, 128, device="cuda", dtype=dtype)
    triton_ops.rope_write_kv(q, k, v, positions, rope.cos, rope.sin, cache, slots)
    assert rel(q, ref_q) < tol and rel(k, ref_k) < tol and rel(cache, ref_cache) < tol
