"""`python -m operators.ferry_operator [--namespace NS] [--health-port 8080] ...`: run the operator.

kopf in standalone mode (one replica: the chart's Deployment uses Recreate; no peering objects),
serving one namespace (FERRY_OPERATOR_NAMESPACE) or every namespace (empty), with kopf's liveness
endpoint at http://<host>:<health_port>/healthz (<host> is $POD_IP when bind_pod_ip, else 0.0.0.0).
"""
from __future__ import annotations

import dataclasses
import os
import sys

from operators.ferry_operator.settings import ENV_PREFIX, OperatorSettings, load_settings


def liveness_endpoint(settings: OperatorSettings, pod_ip: str | None) -> str | None:
    if settings.health_port < 0:
        return None
    host = pod_ip if settings.bind_pod_ip and pod_ip else "0.0.0.0"
    return f"http://{host}:{settings.health_port}/healthz"


def main(argv: list[str] | None = None) -> int:
    settings = load_settings(sys.argv[1:] if argv is None else argv)
    # handlers.py reads its settings from the env at startup: hand the flags on through the env so
    # both see the same values.
    for f in dataclasses.fields(settings):
        os.environ[ENV_PREFIX + f.name.upper()] = str(getattr(settings, f.name))
    import kopf

    from operators.ferry_operator import handlers  # noqa: F401  (registers the handlers with kopf)

    kopf.configure(verbose=os.environ.get("FERRY_LOG_LEVEL", "").upper() == "DEBUG")
    kopf.run(standalone=True, clusterwide=not settings.namespace,
             namespaces=[settings.namespace] if settings.namespace else (),
             liveness_endpoint=liveness_endpoint(settings, os.environ.get("POD_IP")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
