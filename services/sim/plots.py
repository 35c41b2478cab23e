"""PNG plots of one simulation: latency CDFs, replicas and load over time, power against the budget."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from services.sim.results import latencies
from services.sim.simulator import Outcome


def write_plots(out: Outcome, directory: Path, title: str = "") -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = [latency_cdfs(out, directory / "latency_cdf.png", title),
             replicas(out, directory / "replicas.png", title),
             power(out, directory / "power.png", title)]
    return paths


def cdf(ax, values: np.ndarray, label: str, slo: float | None = None) -> None:
    if len(values):          # 2,001 quantiles draw the same curve as millions of points, in milliseconds
        fractions = np.linspace(0.0, 1.0, 2001)
        ax.plot(np.quantile(values, fractions) * 1e3, fractions, label=label)
    if slo:
        ax.axvline(slo * 1e3, color="grey", linestyle="--", linewidth=1)


def latency_cdfs(out: Outcome, path: Path, title: str) -> Path:
    lat = latencies(out)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (name, slo) in zip(axes, (("ttft", out.spec.slo_ttft_s), ("tpot", out.spec.slo_tpot_s),
                                      ("e2el", None)), strict=True):
        cdf(ax, lat[name], name.upper(), slo)
        ax.set_xlabel(f"{name.upper()} (ms)")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of requests")
    fig.suptitle(f"{title} latency CDFs (dashed: SLO)".strip())
    return _save(fig, path)


def replicas(out: Outcome, path: Path, title: str) -> Path:
    s = out.series
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 5), sharex=True)
    for key in sorted(k for k in s if k.startswith("replicas_")):
        top.step(s["t"], s[key], where="post", label=key.removeprefix("replicas_"))
    top.set_ylabel("instances")
    top.legend()
    bottom.plot(s["t"], s["running"], label="decoding")
    bottom.plot(s["t"], s["queued"], label="queued (prefill + KV waiting)")
    bottom.set_ylabel("requests")
    bottom.set_xlabel("time (s)")
    bottom.legend()
    fig.suptitle(f"{title} replicas and load over time".strip())
    return _save(fig, path)


def power(out: Outcome, path: Path, title: str) -> Path:
    s = out.series
    fig, ax = plt.subplots(figsize=(10, 3.6))
    ax.plot(s["t"], np.asarray(s["power_watts"]) / 1e3, label="cluster GPU power")
    if out.spec.power_budget_watts:
        ax.axhline(out.spec.power_budget_watts / 1e3, color="red", linestyle="--", label="budget")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("kW")
    ax.legend()
    fig.suptitle(f"{title} power vs budget".strip())
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
