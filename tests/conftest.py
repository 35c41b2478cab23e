"""Shared fixtures: the real SmolLM2 folder (built by `make install`) and tiny random-weight models."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = Path(os.environ.get("FERRY_MODEL", ROOT / "models" / "SmolLM2-135M-Instruct"))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    if not (SMOLLM2 / "model.safetensors").is_file():
        pytest.fail(f"{SMOLLM2} is missing: run `make install` (it converts the model once)")
    return SMOLLM2


def make_tiny_model(folder: Path, model_type: str = "llama", **overrides) -> Path:
    """A small random-weight HF model folder (saved by transformers) with SmolLM2's tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    params = {"vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
                  "tie_word_embeddings": True, "eos_token_id": 2, "bos_token_id": 1}
    params.update(overrides)
    config = AutoConfig.for_model(model_type, **params)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (SMOLLM2 / name).is_file():
            shutil.copy(SMOLLM2 / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def pytest_collection_modifyitems(config, items):
    """Tests that use the Kubernetes control plane run last: it is session-scoped and keeps running (API
    server, controllers, the test kubelet's pods) until the session ends, which slows every timing-
    sensitive test after it on a 2-core machine. Tests marked `gpu` run only where CUDA is (the lent GPU
    machine); CI has none."""
    items.sort(key=lambda item: "kube_cluster" in getattr(item, "fixturenames", ()))   # stable
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def kube_cluster():
    """A Kubernetes API server: KUBECONFIG's cluster (kind), else a local control plane with the test
    kubelet (tests/kube). The first run on a machine builds the binaries (tests/e2e/toolchain.sh)."""
    from tests.kube.cluster import start_cluster

    cluster = start_cluster()
    yield cluster
    cluster.close()
