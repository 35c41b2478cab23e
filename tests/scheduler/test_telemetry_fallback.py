"""The telemetry fallback: Prometheus first, the built-in scraper while Prometheus does not answer, and
Prometheus again once it has caught up with what the scraper read (`select`, `after_scrape` are pure;
`FallbackSource` wires them to two sources)."""
from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry

from services.scheduler.telemetry import (
    PROMETHEUS,
    SCRAPE,
    TOTALS,
    CounterWindow,
    FallbackSource,
    PrometheusSource,
    ScrapeSource,
    Selection,
    Source,
    TelemetryError,
    after_scrape,
    select,
    telemetry_source,
)


def totals(requests: float) -> dict[str, float]:
    return dict.fromkeys(TOTALS, 0.0) | {"requests": requests}


@pytest.mark.parametrize("current, primary, want", [
    (Selection(), totals(5), Selection()),                                      # Prometheus answers
    (Selection(), None, Selection(SCRAPE)),                                     # ... or not: scrape
    (Selection(SCRAPE), None, Selection(SCRAPE)),                               # still down
    (Selection(SCRAPE), totals(0), Selection(SCRAPE)),                          # back, no mark yet
    (Selection(SCRAPE, totals(10)), totals(9), Selection(SCRAPE, totals(10))),  # back, behind the mark
    (Selection(SCRAPE, totals(10)), totals(10), Selection()),                   # caught up
    (Selection(SCRAPE, totals(10)), totals(12), Selection()),
    (Selection(SCRAPE, totals(10)), None, Selection(SCRAPE)),                   # down again: mark forgotten
])
def test_select(current, primary, want):
    assert select(current, primary) == want


@pytest.mark.parametrize("current, answered, want", [
    (Selection(SCRAPE), False, Selection(SCRAPE)),
    (Selection(SCRAPE), True, Selection(SCRAPE, totals(7))),                    # the mark is this scrape
    (Selection(SCRAPE, totals(3)), True, Selection(SCRAPE, totals(3))),         # the first mark stays
])
def test_after_scrape(current, answered, want):
    assert after_scrape(current, answered, totals(7)) == want


class Fake(Source):
    def __init__(self, name: str) -> None:
        self.name, self.value, self.down = name, totals(0), False

    def describe(self) -> str:
        return self.name

    def read_now(self) -> dict[str, float]:
        if self.down:
            raise TelemetryError(f"{self.name} is down")
        return dict(self.value)


def gauge(registry: CollectorRegistry, source: str) -> float:
    return registry.get_sample_value("ferry_scheduler_telemetry_source", {"source": source})


def test_the_scraper_stands_in_while_prometheus_is_down_and_prometheus_returns_once_caught_up(caplog):
    prometheus, scraper, registry = Fake("prom"), Fake("scrape"), CollectorRegistry()
    source = FallbackSource(prometheus, scraper, registry)
    window = CounterWindow(3600)
    caplog.set_level(logging.INFO, "ferry.scheduler.telemetry")

    def read(t: float) -> dict[str, float]:
        out = source.read_now()
        window.add(t, out)
        return out

    prometheus.value = scraper.value = totals(10)
    assert read(0) == totals(10) and gauge(registry, PROMETHEUS) == 1 and gauge(registry, SCRAPE) == 0
    prometheus.down, scraper.value = True, totals(20)
    assert read(1) == totals(20) and gauge(registry, SCRAPE) == 1 and gauge(registry, PROMETHEUS) == 0
    scraper.value = totals(25)
    assert read(2) == totals(25)
    # Prometheus is back with an empty TSDB: it answers 0, which must not be read (a "reset")
    prometheus.down, prometheus.value, scraper.value = False, totals(0), totals(30)
    assert read(3) == totals(30)
    prometheus.value, scraper.value = totals(29), totals(32)     # scraped once, not since the mark (30)
    assert read(4) == totals(32)
    prometheus.value = totals(34)
    assert read(5) == totals(34) and gauge(registry, PROMETHEUS) == 1
    assert window.increase()["requests"] == 24, "every increase counted once, no reset seen"
    switches = [r.getMessage() for r in caplog.records]
    assert len(switches) == 2, switches                          # one line per switch
    assert "prom does not answer (prom is down); scrape stands in" in switches[0]
    assert "back to prom" in switches[1]


def test_both_down_is_one_telemetry_error_naming_both():
    prometheus, scraper = Fake("prom"), Fake("scrape")
    prometheus.down = scraper.down = True
    source = FallbackSource(prometheus, scraper)
    with pytest.raises(TelemetryError, match="prom is down; and scrape is down"):
        source.read_now()
    scraper.down = False
    assert source.read_now() == totals(0)


def test_telemetry_source_picks_by_settings():
    both = telemetry_source("http://p:9090", "", ["http://g/metrics"], CollectorRegistry())
    assert isinstance(both, FallbackSource) and "Prometheus at http://p:9090 (else scraping" in both.describe()
    registry = CollectorRegistry()
    assert isinstance(telemetry_source("http://p:9090", "", [], registry), PrometheusSource)
    assert gauge(registry, PROMETHEUS) == 1 and gauge(registry, SCRAPE) == 0
    registry = CollectorRegistry()
    assert isinstance(telemetry_source("", "", ["http://g/metrics"], registry), ScrapeSource)
    assert gauge(registry, SCRAPE) == 1 and gauge(registry, PROMETHEUS) == 0
