"""`ferry profile`: the fit recovers known parameters; a real run on SmolLM2 writes a loadable profile."""
from __future__ import annotations

import re
import statistics
import subprocess
import sys
from dataclasses import replace

import pytest

from services.engine.profiler import QUICK, Plan, StepPoint, fit_profile, modeled_seconds, render_yaml
from services.engine.sim_engine import SimProfile
from tests.conftest import ROOT

# Known truths (fixed here: the committed profiles are re-measured and may change).
LLAMA3_8B = SimProfile("llama3-8b-h100", 8.03e9, 32, 4096, 131072, flops=6.0e14, memory_bandwidth=3.0e12,
                       step_overhead_s=0.0005, weight_bytes=1.606e10, vocab_size=128256)
SMOLLM2 = SimProfile("smollm2-135m-cpu", 1.35e8, 30, 576, 46080, flops=6.0e10, memory_bandwidth=1.0e10,
                     step_overhead_s=0.005, weight_bytes=5.4e8, vocab_size=49152)


def shapes(plan: Plan) -> list[tuple[str, tuple[tuple[int, int], ...]]]:
    prefill = [(f"prefill {n}", ((0, n),)) for n in plan.prefill_lens]
    decode = [(f"decode {b}x{c}", ((c, 1),) * b) for c in plan.decode_contexts for b in plan.decode_batches]
    return prefill + decode


@pytest.mark.parametrize("truth, plan", [
    (LLAMA3_8B, Plan()),
    (replace(LLAMA3_8B, step_overhead_s=0.0), Plan()),
    (replace(LLAMA3_8B, flops=2.0e14, memory_bandwidth=1.2e12, step_overhead_s=0.004), Plan()),
    (SMOLLM2, Plan()),
    (SMOLLM2, QUICK),
    (replace(SMOLLM2, flops=1.8e11, memory_bandwidth=9e9, step_overhead_s=0.001), QUICK),
], ids=["llama3-h100", "llama3-no-overhead", "llama3-slow-gpu", "smollm2-cpu", "smollm2-quick", "smollm2-fast-cpu"])
def test_fit_recovers_the_parameters_that_made_the_points(truth, plan):
    points = [StepPoint(label, chunks, modeled_seconds(truth, chunks)) for label, chunks in shapes(plan)]
    constants = replace(truth, flops=1.0, memory_bandwidth=1.0, step_overhead_s=0.0)
    fit = fit_profile(constants, points)
    assert fit.flops == pytest.approx(truth.flops, rel=0.02)
    assert fit.memory_bandwidth == pytest.approx(truth.memory_bandwidth, rel=0.02)
    assert fit.step_overhead_s == pytest.approx(truth.step_overhead_s, rel=0.02, abs=1e-5)


def test_fit_needs_three_points():
    with pytest.raises(ValueError, match="at least 3"):
        fit_profile(SMOLLM2, [StepPoint("decode 1x128", ((128, 1),), 0.05)])


def test_rendered_yaml_loads_back(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(render_yaml(LLAMA3_8B, ["a header", "of two lines"]))
    loaded = SimProfile.load(path)
    assert loaded.name == LLAMA3_8B.name and loaded.num_layers == LLAMA3_8B.num_layers
    assert loaded.flops == pytest.approx(LLAMA3_8B.flops, rel=1e-4)
    assert path.read_text().startswith("# a header\n# of two lines\n")


def ferry_profile(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", "profile", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.parametrize("args, message", [
    (["--model", "no/such/folder"], "config.json not found"),
    (["--device", "tpu"], "device 'tpu': use cpu or cuda"),
])
def test_bad_flags_give_a_clear_error(tmp_path, smollm2_path, args, message):
    result = ferry_profile("--model", str(smollm2_path), "--out", str(tmp_path / "p.yaml"), *args)
    assert result.returncode == 2 and message in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "p.yaml").exists()


def test_argparse_errors_for_missing_out_and_unknown_dtype(tmp_path):
    assert "--out" in ferry_profile().stderr
    bad = ferry_profile("--out", str(tmp_path / "p.yaml"), "--dtype", "int8")
    assert bad.returncode == 2 and "invalid choice: 'int8'" in bad.stderr


@pytest.mark.slow
def test_quick_profile_of_smollm2_writes_a_profile_the_sim_loads(tmp_path, smollm2_path):
    out = tmp_path / "smollm2.yaml"
    result = ferry_profile("--model", str(smollm2_path), "--device", "cpu", "--dtype", "float32",
                           "--out", str(out), "--quick", timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    profile = SimProfile.load(out)
    assert profile.name == "smollm2" and profile.num_layers == 30 and profile.kv_bytes_per_token == 46080
    assert profile.flops > 0 and profile.memory_bandwidth > 0 and profile.step_overhead_s >= 0
    assert "relative error max" in out.read_text().splitlines()[4]
    rows = re.findall(r"decode (\d+)x(\d+)\s+([\d.]+)\s+([\d.]+)\s+([-+\d.]+)%", result.stdout)
    assert len(rows) == len(QUICK.decode_batches) * len(QUICK.decode_contexts)
    errors = {(int(b), int(c)): abs(float(e)) for b, c, _, _, e in rows}
    # Prefill is compute-bound and measures steadily, so the fitted flops must reproduce it: the median
    # point within 35%. Not every point: in the full suite the session's Kubernetes control plane runs
    # beside this test, and one quick point can come out 2x slow (clean-clone CI: prefill 32 measured
    # 146 ms, prefill 128 143 ms). Decode on 2 shared CPU cores is noisier still: its quick points (median of 3)
    # jump by 2x between runs (8x128 measured 29 ms in one run and 100 ms in another, slower than 8x512),
    # and SimProfile has one bandwidth for weights and attention, so decode is held only to 90%. The
    # fit's accuracy is a benchmark's business (docs/benchmarks/engine.md), not this test's.
    prefill = re.findall(r"prefill (\d+)\s+([\d.]+)\s+([\d.]+)\s+([-+\d.]+)%", result.stdout)
    assert len(prefill) == len(QUICK.prefill_lens), result.stdout
    assert statistics.median(abs(float(e)) for *_, e in prefill) < 35, result.stdout
    assert all(err < 90 for err in errors.values()), result.stdout
