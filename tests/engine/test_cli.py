"""`ferry generate`: the engine from the command line (a real process, the tiny model)."""
from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def ferry(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", "generate", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)


def test_cli_generates_and_reports_speed(tiny_llama):
    result = ferry("--model", str(tiny_llama), "--max-tokens", "5", "--raw", "Hello", "The sky is")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("--- ") == 2
    assert "10 tokens in" in result.stdout and "tok/s" in result.stdout


def test_cli_bad_arguments_give_a_clear_error(tmp_path):
    missing = ferry("--model", str(tmp_path), "Hello")
    assert missing.returncode == 2 and "config.json not found" in missing.stdout
    assert "Traceback" not in missing.stdout + missing.stderr
    zero = ferry("--model", str(tmp_path), "--max-tokens", "0", "Hello")
    assert zero.returncode == 2 and "max_tokens must be an integer >= 1" in zero.stdout
