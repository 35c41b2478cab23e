"""A `RoutingPolicy` from YAML: per profile, filters → weighted scorers (with parameters) → picker.

    prefill:                    # also decode: and colocated: (all three are required)
      filters: [serves_model, healthy, not_draining, fits_context, has_kv_room]
      scorers:
        - {type: prefix_affinity, weight: 2, kvstore_credit: 0.5}
        - {type: predicted_ttft, weight: 1, slo_s: 1.0}
      picker: highest           # or round_robin; default highest

A plugin's parameters are its dataclass fields (numbers); leaving one out keeps its default. Presets
ship next to this file (presets/<name>.yaml); `load_policy` takes a preset name or a file path.
Mistakes (wrong types included: it is all one bad-config error) raise ValueError naming the key and the allowed values, e.g.
"ferry.yaml: decode.scorers[1].type: unknown scorer 'fre'; allowed: free_blocks, freeness, …".
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from services.scheduler.policies.filters import FILTERS
from services.scheduler.policies.pickers import PICKERS
from services.scheduler.policies.routing import RoutingPolicy, RoutingProfile, Weighted
from services.scheduler.policies.scorers import FreeBlocks, Freeness, PrefixAffinity, ShortQueue
from services.scheduler.policies.ttft import PredictedTtft

PRESETS_DIR = Path(__file__).with_name("presets")
PRESETS = ("ferry", "load_aware", "round_robin")
DEFAULT_PRESET = "ferry"
SCORERS: dict[str, type] = {s.name: s for s in (PrefixAffinity, FreeBlocks, ShortQueue, Freeness, PredictedTtft)}
PROFILE_NAMES = ("prefill", "decode", "colocated")
PROFILE_KEYS = ("filters", "scorers", "picker")


def default_policy() -> RoutingPolicy:
    """The `ferry` preset (presets/ferry.yaml)."""
    return load_policy(DEFAULT_PRESET)


def load_policy(preset_or_path: str) -> RoutingPolicy:
    """A preset by name (ferry, load_aware, round_robin) or a YAML file."""
    path = PRESETS_DIR / f"{preset_or_path}.yaml" if preset_or_path in PRESETS else Path(preset_or_path)
    if not path.is_file():
        raise ValueError(f"routing config {preset_or_path!r} is neither a preset ({', '.join(PRESETS)}) "
                         "nor a YAML file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path.name}: not valid YAML: {e}") from None
    try:
        return policy_from_mapping(data)
    except ValueError as e:
        raise ValueError(f"{path.name}: {e}") from None


def policy_from_mapping(data: Any) -> RoutingPolicy:
    _check_keys(data, "", PROFILE_NAMES, required=PROFILE_NAMES)
    return RoutingPolicy(**{name: _profile(data[name], name) for name in PROFILE_NAMES})


def _profile(data: Any, where: str) -> RoutingProfile:
    _check_keys(data, where, PROFILE_KEYS, required=("filters", "scorers"))
    filters, scorers = data["filters"], data["scorers"]
    for key, value in (("filters", filters), ("scorers", scorers)):
        if not isinstance(value, list):
            raise ValueError(f"{where}.{key}: must be a list, got {type(value).__name__}")  # noqa: TRY004 (config errors are ValueError)
    return RoutingProfile(
        filters=tuple(_plugin(f, f"{where}.filters[{i}]", FILTERS, "filter")[0] for i, f in enumerate(filters)),
        scorers=tuple(Weighted(*_plugin(s, f"{where}.scorers[{i}]", SCORERS, "scorer", weighted=True))
                      for i, s in enumerate(scorers)),
        picker=_plugin(data.get("picker", "highest"), f"{where}.picker", PICKERS, "picker")[0])


def _plugin(data: Any, where: str, kinds: Mapping[str, type], what: str, weighted: bool = False) -> tuple[Any, float]:
    """(plugin, weight) from "name" or {type: name, weight: w, <parameter>: value, …}."""
    if isinstance(data, str):
        data = {"type": data}
    if not isinstance(data, dict):
        raise ValueError(f"{where}: must be a {what} name or a mapping with `type`, got {data!r}")  # noqa: TRY004
    name = data.get("type")
    if name not in kinds:
        raise ValueError(f"{where}.type: unknown {what} {name!r}; allowed: {', '.join(sorted(kinds))}")
    cls = kinds[name]
    parameters = tuple(f.name for f in dataclasses.fields(cls))
    _check_keys(data, where, ("type",) + (("weight",) if weighted else ()) + parameters, required=("type",))
    weight = _number(data, "weight", where, 1.0)
    if weight < 0:
        raise ValueError(f"{where}.weight: must be >= 0, got {weight:g}")
    values = {key: _number(data, key, where) for key in parameters if key in data}
    try:
        return cls(**values), weight
    except ValueError as e:
        raise ValueError(f"{where} ({name}): {e}") from None


def _number(data: Mapping, key: str, where: str, default: float | None = None) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}.{key}: must be a number, got {value!r}")  # noqa: TRY004
    return float(value)


def _check_keys(data: Any, where: str, allowed: tuple[str, ...], required: tuple[str, ...]) -> None:
    label = where or "the top level"
    if not isinstance(data, dict):
        raise ValueError(f"{label}: must be a mapping with keys {', '.join(allowed)}, "  # noqa: TRY004
                         f"got {type(data).__name__}")
    for key in data:
        if key not in allowed:
            raise ValueError(f"{_join(where, key)}: unknown key; allowed: {', '.join(allowed) or 'none'}")
    for key in required:
        if key not in data:
            raise ValueError(f"{_join(where, key)}: missing (required: {', '.join(required)})")


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)
