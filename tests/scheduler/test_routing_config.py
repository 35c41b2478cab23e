"""The YAML routing config: presets load, a custom file builds what it says, and every mistake is a
ValueError naming the key and what is allowed."""
from __future__ import annotations

import pytest
import yaml

from services.scheduler.main import SchedulerSettings
from services.scheduler.policies.config import PRESETS, default_policy, load_policy, policy_from_mapping
from services.scheduler.policies.filters import Healthy, ServesModel
from services.scheduler.policies.pickers import RoundRobin
from services.scheduler.policies.routing import PickHighest
from services.scheduler.policies.scorers import Freeness, PrefixAffinity
from services.scheduler.policies.ttft import PredictedTtft

GOOD = {
    "prefill": {"filters": ["serves_model", {"type": "healthy"}],
                "scorers": [{"type": "prefix_affinity", "weight": 3, "kvstore_credit": 0.25},
                            {"type": "predicted_ttft", "slo_s": 2.5}]},
    "decode": {"filters": [], "scorers": ["freeness"], "picker": "round_robin"},
    "colocated": {"filters": ["healthy"], "scorers": [], "picker": {"type": "highest"}},
}


def test_a_custom_config_builds_what_it_says():
    policy = policy_from_mapping(GOOD)
    assert policy.prefill.filters == (ServesModel(), Healthy())
    first, second = policy.prefill.scorers
    assert (first.scorer, first.weight) == (PrefixAffinity(kvstore_credit=0.25), 3.0)
    assert (second.scorer, second.weight) == (PredictedTtft(slo_s=2.5), 1.0), "unset parameters keep defaults"
    assert policy.prefill.picker == PickHighest()
    assert [w.scorer for w in policy.decode.scorers] == [Freeness()]
    assert policy.decode.picker == RoundRobin()
    assert policy.prefill.weight_sum == 4.0


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_load(preset):
    policy = load_policy(preset)
    assert len(policy.decode.filters) == 5


def test_the_default_is_the_ferry_preset_and_load_aware_has_no_prefix_or_ttft():
    assert default_policy() == load_policy("ferry")
    names = {w.scorer.name for p in (load_policy("load_aware").prefill, load_policy("load_aware").decode)
             for w in p.scorers}
    assert names == {"freeness"}
    assert load_policy("round_robin").decode.picker == RoundRobin()


def test_a_file_path_loads(tmp_path):
    path = tmp_path / "routing.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    assert load_policy(str(path)) == policy_from_mapping(GOOD)


def with_(path: str, value) -> dict:
    """GOOD with one key (dotted path; list indexes as numbers) replaced, or removed when value is ..."""
    data = yaml.safe_load(yaml.safe_dump(GOOD))
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = data
    for p in parents:
        node = node[p]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return data


BAD_CASES = [
    # (id, config, fragments the message must contain)
    ("not a mapping", [1, 2], ["the top level", "prefill, decode, colocated"]),
    ("missing profile", with_("colocated", ...), ["colocated: missing"]),
    ("unknown profile", {**GOOD, "extra": {}}, ["extra: unknown key", "prefill, decode, colocated"]),
    ("unknown profile key", with_("decode.weights", 1), ["decode.weights: unknown key", "filters, scorers, picker"]),
    ("missing scorers", with_("decode.scorers", ...), ["decode.scorers: missing"]),
    ("filters not a list", with_("decode.filters", "healthy"), ["decode.filters: must be a list"]),
    ("unknown filter", with_("prefill.filters.1", "hungry"),
     ["prefill.filters[1].type: unknown filter 'hungry'", "fits_context, has_kv_room, healthy"]),
    ("unknown scorer", with_("prefill.scorers.0.type", "fre"),
     ["prefill.scorers[0].type: unknown scorer 'fre'", "free_blocks, freeness, predicted_ttft"]),
    ("unknown picker", with_("decode.picker", "random"), ["decode.picker.type: unknown picker 'random'",
                                                          "highest, round_robin"]),
    ("unknown parameter", with_("prefill.scorers.1.slo", 1), ["prefill.scorers[1].slo: unknown key",
                                                              "slo_s, prefill_tokens_per_s"]),
    ("parameter on a filter", with_("prefill.filters.1", {"type": "healthy", "weight": 2}),
     ["prefill.filters[1].weight: unknown key"]),
    ("text for a number", with_("prefill.scorers.1.slo_s", "fast"), ["prefill.scorers[1].slo_s: must be a number"]),
    ("out of range", with_("prefill.scorers.0.kvstore_credit", 2), ["prefill.scorers[0] (prefix_affinity)",
                                                                   "kvstore_credit must be in [0, 1]"]),
    ("zero SLO", with_("prefill.scorers.1.slo_s", 0), ["slo_s must be > 0"]),
    ("negative weight", with_("prefill.scorers.0.weight", -1), ["prefill.scorers[0].weight: must be >= 0"]),
    ("scorer without type", with_("prefill.scorers.0", {"weight": 1}), ["unknown scorer None"]),
]


@pytest.mark.parametrize("config, fragments", [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_bad_configs_say_what_to_change(config, fragments):
    with pytest.raises(ValueError) as error:
        policy_from_mapping(config)
    for fragment in fragments:
        assert fragment in str(error.value)


def test_unknown_preset_or_missing_file():
    with pytest.raises(ValueError, match="neither a preset .ferry, load_aware, round_robin. nor a YAML file"):
        load_policy("fastest")


def test_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("prefill: [unclosed")
    with pytest.raises(ValueError, match="broken.yaml: not valid YAML"):
        load_policy(str(path))


def test_scheduler_settings_check_the_routing_config(tmp_path):
    assert SchedulerSettings().routing_config == "ferry"
    assert SchedulerSettings(routing_config="round_robin").routing_config == "round_robin"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(with_("decode.picker", "random")))
    with pytest.raises(ValueError, match="--routing-config: bad.yaml: decode.picker.type: unknown picker"):
        SchedulerSettings(routing_config=str(path))
