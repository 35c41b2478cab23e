"""What the gateways count, as the scheduler's slow loop reads it: from Prometheus through its HTTP API
(`--prometheus-url`, PromQL), or — when no Prometheus is configured — by scraping the gateways'
/metrics itself (`--gateway-metrics-urls`). With both, `FallbackSource` reads Prometheus and lets the
scraper stand in while Prometheus does not answer. Both give the same totals, summed over every gateway:

    requests            generation requests finished (any status but 4xx: bad input is not demand)
    prompt_tokens       prompt tokens processed
    generation_tokens   tokens generated
    ttft_met/_total     finished requests whose TTFT met the gateway's SLO, and all that were judged
    tpot_met/_total     the same for TPOT

Both read instantaneous totals (PromQL `sum(...)` instant queries; the scraper sums the samples), and
`CounterWindow` turns successive reads into increases over a window. So the window math is the same
whichever source feeds it, and a test can compare the two exactly.
"""
from __future__ import annotations

import asyncio
import json
import logging
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.parser import text_string_to_metric_families

TOTALS = ("requests", "prompt_tokens", "generation_tokens", "ttft_met", "ttft_total", "tpot_met", "tpot_total")
TIMEOUT_S = 5.0
PROMETHEUS, SCRAPE = "prometheus", "scrape"
log = logging.getLogger("ferry.scheduler.telemetry")


class TelemetryError(Exception):
    """A source could not be read; the message names it and says why."""


def promql_queries(selector: str) -> dict[str, str]:
    """Each total as a PromQL instant query; `selector` (e.g. `namespace="ferry",ferry_cluster="x"`)
    scopes every query to one cluster when a Prometheus watches several."""
    def q(metric: str, extra: str = "") -> str:
        labels = ",".join(filter(None, (selector, extra)))
        return f"sum({metric}{{{labels}}})"
    slo = "ferry_gateway_slo_requests_total"
    return {"requests": q("ferry_gateway_requests_total", 'status!~"4.."'),
            "prompt_tokens": q("ferry_gateway_prompt_tokens_total"),
            "generation_tokens": q("ferry_gateway_generation_tokens_total"),
            "ttft_met": q(slo, 'slo="ttft",result="met"'), "ttft_total": q(slo, 'slo="ttft"'),
            "tpot_met": q(slo, 'slo="tpot",result="met"'), "tpot_total": q(slo, 'slo="tpot"')}


class Source:
    """Reads the gateways' totals: `read_now` blocks; `read` (for the slow loop) runs it in a thread."""

    def describe(self) -> str:
        raise NotImplementedError

    def read_now(self) -> dict[str, float]:
        raise NotImplementedError

    async def read(self) -> dict[str, float]:
        return await asyncio.to_thread(self.read_now)


class PrometheusSource(Source):
    """Totals from a Prometheus server's HTTP API (`GET /api/v1/query`)."""

    def __init__(self, url: str, selector: str = "") -> None:
        self.url = url.rstrip("/")
        self.queries = promql_queries(selector)

    def describe(self) -> str:
        return f"Prometheus at {self.url}"

    def read_now(self) -> dict[str, float]:
        return {name: self.query(query) for name, query in self.queries.items()}

    def query(self, promql: str) -> float:
        """One instant query whose answer is a single number (an empty vector is 0: nothing counted)."""
        address = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        try:
            with urllib.request.urlopen(address, timeout=TIMEOUT_S) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:300]
            raise TelemetryError(f"Prometheus {self.url} refused {promql!r}: HTTP {e.code} {detail}") from None
        except (OSError, ValueError) as e:
            raise TelemetryError(f"Prometheus {self.url} did not answer {promql!r}: {e}") from None
        if body.get("status") != "success":
            raise TelemetryError(f"Prometheus {self.url}: {promql!r}: {body.get('error', body)}")
        result = body["data"]["result"]
        return float(result[0]["value"][1]) if result else 0.0


class ScrapeSource(Source):
    """Totals scraped from the gateways' /metrics by the scheduler itself (no Prometheus needed)."""

    def __init__(self, urls: Iterable[str]) -> None:
        self.urls = tuple(urls)

    def describe(self) -> str:
        return f"scraping {', '.join(self.urls) or 'nothing'}"

    def read_now(self) -> dict[str, float]:
        totals = dict.fromkeys(TOTALS, 0.0)
        for url in self.urls:
            try:
                with urllib.request.urlopen(url, timeout=TIMEOUT_S) as r:
                    text = r.read().decode()
            except OSError as e:
                raise TelemetryError(f"cannot scrape {url}: {e}") from None
            for name, value in totals_of(text).items():
                totals[name] += value
        return totals


@dataclass(frozen=True, slots=True)
class Selection:
    """Which source the fallback reads from, and — while the scraper stands in and Prometheus answers
    again — `mark`: what the scraper read when Prometheus came back, which Prometheus must reach first."""
    source: str = PROMETHEUS
    mark: dict[str, float] | None = None


def caught_up(primary: dict[str, float], mark: dict[str, float]) -> bool:
    return all(primary.get(name, 0.0) >= value for name, value in mark.items())


def select(current: Selection, primary: dict[str, float] | None) -> Selection:
    """The source of this read, given Prometheus' answer (None: it did not answer). Pure.

    Prometheus whenever it answers, except just after the scraper stood in: a Prometheus that has
    just come back may not have scraped the gateways since (an empty TSDB reads 0), and a total that
    falls looks like a counter reset to `CounterWindow` — a burst of demand that never happened. So
    it is used again once its totals reach what the scraper read when it first answered again."""
    if primary is None:
        return Selection(SCRAPE)
    if current.source == PROMETHEUS:
        return current
    if current.mark is not None and caught_up(primary, current.mark):
        return Selection(PROMETHEUS)
    return current


def after_scrape(current: Selection, primary_answered: bool, scraped: dict[str, float]) -> Selection:
    """The first scrape while Prometheus answers again sets the mark Prometheus must catch up to. Pure."""
    if primary_answered and current.mark is None:
        return Selection(SCRAPE, dict(scraped))
    return current


class FallbackSource(Source):
    """Prometheus first; the built-in scraper while Prometheus does not answer (or has not caught up
    since it came back). Each switch is logged once; `ferry_scheduler_telemetry_source{source}` is 1
    for the source the last read used."""

    def __init__(self, primary: Source, fallback: Source, registry: CollectorRegistry | None = None) -> None:
        self.primary, self.fallback = primary, fallback
        self.selection = Selection()
        self.gauge = source_gauge(registry)
        self._show(PROMETHEUS)

    def describe(self) -> str:
        return f"{self.primary.describe()} (else {self.fallback.describe()})"

    def read_now(self) -> dict[str, float]:
        primary, why = None, ""
        try:
            primary = self.primary.read_now()
        except TelemetryError as e:
            why = str(e)
        selection = select(self.selection, primary)
        if selection.source == PROMETHEUS:
            self._switch(selection, "it answers again and has caught up with the gateways")
            return primary
        try:
            scraped = self.fallback.read_now()
        except TelemetryError as e:
            self._switch(selection, why)
            raise TelemetryError(f"{why or 'Prometheus has not caught up'}; and {e}") from None
        self._switch(after_scrape(selection, primary is not None, scraped), why)
        return scraped

    def _switch(self, selection: Selection, why: str) -> None:
        if selection.source != self.selection.source:
            if selection.source == SCRAPE:
                log.warning("telemetry: %s does not answer (%s); %s stands in", self.primary.describe(), why,
                            self.fallback.describe())
            else:
                log.info("telemetry: back to %s: %s", self.primary.describe(), why)
            self._show(selection.source)
        self.selection = selection

    def _show(self, source: str) -> None:
        if self.gauge is not None:
            for name in (PROMETHEUS, SCRAPE):
                self.gauge.labels(source=name).set(1.0 if name == source else 0.0)


def source_gauge(registry: CollectorRegistry | None) -> Gauge | None:
    if registry is None:
        return None
    return Gauge("ferry_scheduler_telemetry_source", "The source of the gateways' counters the autoscaler last "
                 "read (1): prometheus, or scrape (the built-in scraper)", ["source"], registry=registry)


def telemetry_source(prometheus_url: str, selector: str, gateway_urls: Iterable[str],
                     registry: CollectorRegistry | None = None) -> Source:
    """The autoscaler's source: Prometheus, the scraper, or Prometheus with the scraper as fallback."""
    urls = tuple(gateway_urls)
    if prometheus_url and urls:
        return FallbackSource(PrometheusSource(prometheus_url, selector), ScrapeSource(urls), registry)
    gauge = source_gauge(registry)
    if gauge is not None:
        for name in (PROMETHEUS, SCRAPE):
            gauge.labels(source=name).set(1.0 if (name == PROMETHEUS) == bool(prometheus_url) else 0.0)
    return PrometheusSource(prometheus_url, selector) if prometheus_url else ScrapeSource(urls)


def totals_of(exposition: str) -> dict[str, float]:
    """The totals in one service's Prometheus text exposition (what `promql_queries` asks Prometheus)."""
    totals = dict.fromkeys(TOTALS, 0.0)
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            name, labels = sample.name, sample.labels
            if name == "ferry_gateway_requests_total" and not labels.get("status", "").startswith("4"):
                totals["requests"] += sample.value
            elif name == "ferry_gateway_prompt_tokens_total":
                totals["prompt_tokens"] += sample.value
            elif name == "ferry_gateway_generation_tokens_total":
                totals["generation_tokens"] += sample.value
            elif name == "ferry_gateway_slo_requests_total" and labels.get("slo") in ("ttft", "tpot"):
                slo = labels["slo"]
                totals[f"{slo}_total"] += sample.value
                if labels.get("result") == "met":
                    totals[f"{slo}_met"] += sample.value
    return totals


class CounterWindow:
    """Successive totals -> their increase over the last `window_s`. A total that falls (a gateway
    restarted and its counters began again) counts from zero, as Prometheus' `increase()` does."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._increments: deque[tuple[float, dict[str, float]]] = deque()   # (since, increase to the next)
        self._last: tuple[float, dict[str, float]] | None = None

    def add(self, now: float, totals: dict[str, float]) -> None:
        if self._last is not None:
            since, last = self._last
            step = {k: v - last.get(k, 0.0) if v >= last.get(k, 0.0) else v for k, v in totals.items()}
            self._increments.append((since, step))
        self._last = (now, dict(totals))
        while self._increments and self._increments[0][0] < now - self.window_s:
            self._increments.popleft()

    def increase(self) -> dict[str, float]:
        out = dict.fromkeys(TOTALS, 0.0)
        for _, step in self._increments:
            for k, v in step.items():
                out[k] = out.get(k, 0.0) + v
        return out

    def span_s(self, now: float) -> float:
        """Seconds the increases cover (less than the window until enough reads came in)."""
        return min(self.window_s, now - self._increments[0][0]) if self._increments else 0.0
