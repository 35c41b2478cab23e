"""The gateway's SLO counters: each finished request is judged once against TTFT, TPOT and both."""
from __future__ import annotations

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.gateway.main import GatewaySettings
from services.gateway.metrics import SLO, GatewayMetrics
from tests.procs import ROOT


def samples(metrics: GatewayMetrics, name: str) -> dict[tuple, float]:
    text = generate_latest(metrics.registry).decode()
    return {tuple(sorted(s.labels.items())): s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == name}


def counts(metrics: GatewayMetrics) -> dict[tuple[str, str], float]:
    return {(dict(k)["slo"], dict(k)["result"]): v
            for k, v in samples(metrics, "ferry_gateway_slo_requests_total").items()}


def test_targets_are_exported_in_seconds():
    m = GatewayMetrics(SLO(ttft_s=0.5, tpot_s=0.05))
    assert samples(m, "ferry_gateway_slo_target_seconds") == {(("slo", "ttft"),): 0.5, (("slo", "tpot"),): 0.05}


def test_every_series_starts_at_zero():
    assert counts(GatewayMetrics()) == {(slo, result): 0.0 for slo in ("ttft", "tpot", "all")
                                        for result in ("met", "missed")}


@pytest.mark.parametrize("ttft, tpot, met", [
    (0.4, 0.04, {"ttft", "tpot", "all"}),
    (0.6, 0.04, {"tpot"}),
    (0.4, 0.06, {"ttft"}),
    (0.6, 0.06, set()),
    (0.5, 0.05, {"ttft", "tpot", "all"}),          # on the objective is within it
    (0.4, None, {"ttft", "tpot", "all"}),          # one output token: no TPOT, so it is met
    (0.6, None, {"tpot"}),
])
def test_one_request_is_counted_once_per_objective(ttft, tpot, met):
    m = GatewayMetrics(SLO(ttft_s=0.5, tpot_s=0.05))
    m.observe_slo(ttft, tpot)
    got = {k: v for k, v in counts(m).items() if v}
    assert got == {(slo, "met" if slo in met else "missed"): 1.0 for slo in ("ttft", "tpot", "all")}


def test_settings_default_to_the_h100_chat_slo_and_reject_zero():
    model = str(ROOT / "models" / "SmolLM2-135M-Instruct")
    s = GatewaySettings(model=model)
    assert (s.slo_ttft_ms, s.slo_tpot_ms) == (2000.0, 100.0)
    with pytest.raises(ValueError, match="--slo-tpot-ms"):
        GatewaySettings(model=model, slo_tpot_ms=0)
