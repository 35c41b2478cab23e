"""SimEngine: the real scheduler and block pool with a performance model instead of the model."""
from __future__ import annotations

import pytest

from services.engine.config import EngineConfig
from services.engine.sampling import SamplingParams
from services.engine.sim_engine import SimEngine, SimProfile

CONFIG = EngineConfig(model="-", max_num_seqs=8, max_num_batched_tokens=512)


def sim(num_blocks: int = 256, profile: str = "llama3-8b-h100") -> SimEngine:
    return SimEngine(CONFIG, SimProfile.load(profile), num_blocks=num_blocks)


def test_sim_tokens_are_deterministic_per_seed():
    params = [SamplingParams(max_tokens=12, seed=s) for s in (1, 1, 2)]
    a, b, c = sim().generate([[5] * 20, [9] * 33, [5] * 20], params)
    assert a == b and a != c and len(a) == 12


def test_sim_clock_follows_the_roofline():
    engine = sim()
    engine.add_request("long", list(range(2000, 2400)), SamplingParams(max_tokens=3))
    engine.step()                                    # a 400-token prefill chunk: compute-bound
    prefill = engine.last_step_seconds
    engine.step()                                    # one decode token: weight-read-bound
    decode = engine.last_step_seconds
    p = engine.profile
    assert decode == pytest.approx(p.step_overhead_s + (p.weight_bytes + 401 * p.kv_bytes_per_token)
                                   / p.memory_bandwidth, rel=1e-6)
    assert prefill > decode and engine.clock == pytest.approx(prefill + decode)


def test_sim_request_moves_between_engines_and_continues_identically():
    params = SamplingParams(max_tokens=30, seed=11)
    expected = sim().generate([list(range(100, 150))], params)[0]
    source, target = sim(), sim()
    source.add_request("r", list(range(100, 150)), params)
    while source.seqs["r"].num_output_tokens < 10:
        source.step()
    payload = source.export_kv("r")
    source.abort("r")
    assert target.import_kv(payload)
    tokens = list(payload.token_ids[50:])
    while target.has_unfinished:
        tokens += [t for out in target.step() for t in out.new_token_ids]
    assert tokens == expected
    assert source.kv.num_free_blocks == 256


def test_sim_preempts_instead_of_failing_when_blocks_run_out():
    engine = sim(num_blocks=12)                      # 192 tokens for 4 requests of up to 80
    outputs = engine.generate([[i] * 40 for i in range(4)], SamplingParams(max_tokens=40))
    assert [len(o) for o in outputs] == [40] * 4
    assert engine.num_preemptions > 0 and engine.kv.num_free_blocks == 12


@pytest.mark.parametrize("name, message", [("no-such-profile", "no sim profile"),
                                           ("bad", "unknown profile fields")])
def test_sim_profile_errors_say_what_to_fix(tmp_path, name, message):
    (tmp_path / "bad.yaml").write_text("name: x\nflops_typo: 1\n")
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        SimProfile.load(tmp_path / "bad.yaml" if name == "bad" else name)
