"""`ferry up`'s argument checks: what it refuses before starting anything, and the profile autoscaling
sizes pools with."""
from __future__ import annotations

import pytest

from services.platforms.local import autoscale_profile, build_parser, main, scheduler_flags


def args(*argv: str):
    return build_parser().parse_args(list(argv))


@pytest.mark.parametrize("argv, profile", [
    (("--engine", "sim", "--sim-profile", "llama3-8b-h100"), "llama3-8b-h100"),
    ((), "smollm2-135m-cpu"),
    (("--device", "cuda", "--scheduler-arg", "autoscale-profile=/p/h200.yaml"), ""),
])
def test_autoscaling_sizes_pools_with_the_profile_of_what_runs(argv, profile):
    assert autoscale_profile(args("--autoscale", *argv)) == profile


def test_a_gpu_without_a_measured_profile_is_refused_with_the_way_to_make_one(capsys, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert main(["--model", str(tmp_path), "--autoscale", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "ferry profile" in err and "autoscale-profile=" in err


def test_scheduler_args_become_flags_and_unknown_ones_are_refused():
    assert scheduler_flags(["routing-config=round_robin"]) == ["--routing-config", "round_robin"]
    with pytest.raises(ValueError, match="no setting"):
        scheduler_flags(["no-such-setting=1"])
    with pytest.raises(ValueError, match="sets --port itself"):
        scheduler_flags(["port=1"])
