"""Load HF-format safetensors weights into `LlamaModel`, fusing q|k|v and gate|up as they stream in.

No transformers model is ever built: tensors go straight from the file to our parameters, in the
engine's dtype, on its device. `load_format="dummy"` fills random weights instead (benchmarks).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from services.engine.model import LlamaModel

# HF name suffix -> (our parameter, which slice of the fused projection)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {folder}: convert the model first (make install)")
    return files


def load_weights(model: LlamaModel, folder: str | Path) -> None:
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for path in safetensors_files(Path(folder)):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                target, shard = _target(name)
                if target not in params:
                    if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and
                                                                model.config.tie_word_embeddings):
                        continue
                    raise ValueError(f"{path.name}: unexpected tensor {name!r}")
                _copy_into(params[target], f.get_tensor(name), shard, model, target)
                loaded.add(target)
    missing = set(params) - loaded - ({"lm_head.weight"} if model.config.tie_word_embeddings else set())
    if missing:
        raise ValueError(f"weights missing from {folder}: {sorted(missing)[:5]}")


def init_dummy_weights(model: LlamaModel, seed: int = 0) -> None:
    """Random weights with a sane scale (so activations stay finite), for shape-only benchmarks."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)


def _target(hf_name: str) -> tuple[str, int | None]:
    name = hf_name.removeprefix("model.")
    for suffix, (fused, shard) in _FUSED.items():
        if f".{suffix}." in name:
            return name.replace(suffix, fused), shard
    return name, None


def _copy_into(param: torch.Tensor, tensor: torch.Tensor, shard: int | None, model: LlamaModel,
               target: str) -> None:
    with torch.no_grad():
        if shard is None:
            if param.shape != tensor.shape:
                raise ValueError(f"shape {tuple(tensor.shape)} does not fit parameter {tuple(param.shape)}")
            param.copy_(tensor)
            return
        cfg = model.config
        if ".gate_up_proj." in target:
            sizes = [cfg.intermediate_size] * 2
        else:                                                    # q|k|v
            sizes = [cfg.num_heads * cfg.head_dim] + [cfg.num_kv_heads * cfg.head_dim] * 2
        start = sum(sizes[:shard])
        param[start:start + sizes[shard]].copy_(tensor)
