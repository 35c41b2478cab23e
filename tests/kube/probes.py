"""Readiness probes of the test kubelet: httpGet, tcpSocket and exec, as a kubelet runs them."""
from __future__ import annotations

import socket
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass, field

MAX_PERIOD_S = 1.0   # probes run at most this far apart (faster than a kubelet's 10 s default: tests)


def resolve_port(port, container: dict) -> int:
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return int(p["containerPort"])
    raise ValueError(f"named port {port!r} is not declared by container {container.get('name')!r}")


def run_probe(probe: dict, container: dict, pod_ip: str, env: dict[str, str]) -> bool:
    timeout = float(probe.get("timeoutSeconds", 1))
    try:
        if "httpGet" in probe:
            h = probe["httpGet"]
            url = f"{h.get('scheme', 'HTTP').lower()}://{h.get('host') or pod_ip}:" \
                  f"{resolve_port(h['port'], container)}{h.get('path', '/')}"
            with urllib.request.urlopen(url, timeout=timeout) as r:
                return 200 <= r.status < 400
        if "tcpSocket" in probe:
            t = probe["tcpSocket"]
            with socket.create_connection((t.get("host") or pod_ip, resolve_port(t["port"], container)), timeout):
                return True
        if "exec" in probe:
            return subprocess.run(probe["exec"]["command"], check=False, env=env, timeout=timeout,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
    except (OSError, urllib.error.URLError, subprocess.TimeoutExpired, ValueError):
        return False
    return False


@dataclass
class ProbeState:
    """Consecutive results against the probe's thresholds; `ready` flips as a kubelet's would."""
    probe: dict | None
    started_at: float
    ready: bool = False
    successes: int = 0
    failures: int = 0
    next_at: float = field(default=0.0)

    def due(self, now: float) -> bool:
        if self.probe is None:
            return False
        return now >= max(self.next_at, self.started_at + float(self.probe.get("initialDelaySeconds", 0)))

    def record(self, ok: bool, now: float) -> None:
        period = min(float(self.probe.get("periodSeconds", 10)), MAX_PERIOD_S)
        self.next_at = now + period
        if ok:
            self.successes, self.failures = self.successes + 1, 0
            if self.successes >= int(self.probe.get("successThreshold", 1)):
                self.ready = True
        else:
            self.successes, self.failures = 0, self.failures + 1
            if self.failures >= int(self.probe.get("failureThreshold", 3)):
                self.ready = False
