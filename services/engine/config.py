"""Engine and model configuration: what the model is (read from HF `config.json`) and how to run it."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """Llama 3's frequency-dependent RoPE scaling (`rope_type: llama3`)."""
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True, slots=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    rope_scaling: RopeScaling | None = None
    eos_token_ids: tuple[int, ...] = ()
    sliding_window: int | None = None

    @classmethod
    def from_dict(cls, cfg: dict, generation_cfg: dict | None = None) -> ModelConfig:
        model_type = cfg.get("model_type", "")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not supported; "
                             f"use one of {', '.join(SUPPORTED_MODEL_TYPES)}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {cfg['hidden_act']!r} is not supported; only 'silu'")
        # transformers >= 5 writes `rope_parameters`; older configs have rope_theta + rope_scaling.
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"rope_type {rope_type!r} is not supported; use 'default' or 'llama3'")
        scaling = None
        if rope_type == "llama3":
            scaling = RopeScaling(float(rope["factor"]), float(rope["low_freq_factor"]),
                                  float(rope["high_freq_factor"]),
                                  int(rope["original_max_position_embeddings"]))
        num_heads = cfg["num_attention_heads"]
        eos = (generation_cfg or {}).get("eos_token_id", cfg.get("eos_token_id"))
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads", num_heads),
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            qkv_bias=cfg.get("attention_bias", model_type == "qwen2"),
            rope_scaling=scaling,
            eos_token_ids=eos_ids,
            sliding_window=window,
        )

    @classmethod
    def from_folder(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}/config.json not found: point --model at an HF model folder")
        gen_path = path / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.is_file() else None
        return cls.from_dict(json.loads((path / "config.json").read_text()), gen)

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype.itemsize


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How one worker runs its engine. Every limit here is checked in `validate()`."""
    model: str                                  # HF-format folder
    device: str = "cpu"
    dtype: str = "float32"
    block_size: int = 16
    num_blocks: int | None = None               # None: from kv_cache_memory_gb (CPU) or free GPU memory
    kv_cache_memory_gb: float = 0.5             # CPU KV budget when num_blocks is None
    gpu_memory_utilization: float = 0.85        # share of total GPU memory for weights + KV
    max_model_len: int | None = None            # None: the model's max_position_embeddings (capped)
    max_num_seqs: int = 64                      # running requests in one batch
    max_num_batched_tokens: int = 2048          # token budget of one step (prefill chunks + decodes)
    enable_prefix_caching: bool = True
    cuda_graphs: bool = True
    load_format: str = "safetensors"            # or "dummy": random weights, for benchmarks
    seed: int = 0
    model_id: str = field(default="")           # name in KV layouts; defaults to the folder name

    def validate(self) -> None:
        checks = [
            (self.dtype in DTYPES, f"dtype {self.dtype!r}: use one of {', '.join(DTYPES)}"),
            (self.device.split(":")[0] in ("cpu", "cuda"), f"device {self.device!r}: use cpu or cuda"),
            (self.block_size > 0 and self.block_size & (self.block_size - 1) == 0,
             f"block_size {self.block_size}: use a power of two"),
            (self.max_num_seqs > 0, "max_num_seqs must be > 0"),
            (self.max_num_batched_tokens >= self.max_num_seqs,
             "max_num_batched_tokens must be >= max_num_seqs (every running request needs a token)"),
            (self.num_blocks is None or self.num_blocks > 0, "num_blocks must be > 0"),
            (self.load_format in ("safetensors", "dummy"), "load_format: use safetensors or dummy"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]
