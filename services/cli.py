"""The ``ferry`` command line: one entry point whose subcommands hand off to each service.

    ferry generate --model models/SmolLM2-135M-Instruct "The capital of France is"
    ferry serve gateway|scheduler|prefill|decode|kvstore [options]
    ferry up [--prefill N --decode M | --colocated]
    ferry bench --base-url http://127.0.0.1:8000 ...
    ferry profile --model models/SmolLM2-135M-Instruct --device cpu --out services/engine/profiles/NAME.yaml
    ferry sim --trace ../shared/data/traces/azure_llm_2023_conv.csv --config llama3-8b-h100-disagg
    ferry admin instances | drain INSTANCE | preempt INSTANCE --in 30
    ferry admin api-key create NAME [--rpm N] [--tpm N]
    ferry admin tls create DIR [--days N]

Each subcommand imports its service only when it runs, so ``ferry --help`` stays fast and a
subcommand's heavy dependencies (torch, transformers) load only when needed. Everything after the
subcommand's name is passed through unchanged to that service's own ``main(argv)``, which owns the
options (``ferry generate --help`` prints the engine's help).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

Handler = Callable[[list[str]], int]


def _generate(argv: list[str]) -> int:
    """Generate text with the engine (``services.engine.cli``)."""
    from services.engine.cli import main as engine_main

    return int(engine_main(argv) or 0)


SERVICES = ("gateway", "scheduler", "prefill", "decode", "kvstore")


def _serve(argv: list[str]) -> int:
    """Run one service process: ``services.<name>.main.main(argv)``."""
    if not argv or argv[0] not in SERVICES:
        print(f"usage: ferry serve {{{','.join(SERVICES)}}} [--help]", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(f"services.{argv[0]}.main")
    return int(module.main(argv[1:]) or 0)


def _up(argv: list[str]) -> int:
    """Start the whole stack locally (``services.platforms.local``)."""
    from services.platforms.local import main as up_main

    return int(up_main(argv) or 0)


def _bench(argv: list[str]) -> int:
    """Benchmark an OpenAI-compatible endpoint (``services.benchmark.cli``)."""
    from services.benchmark.cli import main as bench_main

    return int(bench_main(argv) or 0)


def _profile(argv: list[str]) -> int:
    """Measure the real engine and write a sim profile (``services.engine.profiler``)."""
    from services.engine.profiler import main as profile_main

    return int(profile_main(argv) or 0)


def _sim(argv: list[str]) -> int:
    """Simulate a cluster over a trace (``services.sim.cli``)."""
    from services.sim.cli import main as sim_main

    return int(sim_main(argv) or 0)


def _admin(argv: list[str]) -> int:
    """Operate a running scheduler (``services.scheduler.admin``); ``api-key`` creates a gateway API key
    (``services.gateway.api_keys``) and ``tls`` certificates for mutual TLS (``services.common.service_tls``),
    no scheduler involved."""
    if argv[:1] == ["api-key"]:
        from services.gateway.api_keys import main as api_key_main

        return int(api_key_main(argv[1:]) or 0)
    if argv[:1] == ["tls"]:
        from services.common.service_tls import main as tls_main

        return int(tls_main(argv[1:]) or 0)
    from services.scheduler.admin import main as admin_main

    return int(admin_main(argv) or 0)


COMMANDS: dict[str, tuple[Handler, str]] = {
    "generate": (_generate, "generate text with the engine (options: ferry generate --help)"),
    "serve": (_serve, f"run one service: {', '.join(SERVICES)} (ferry serve NAME --help)"),
    "up": (_up, "start the whole stack on this machine (ferry up --help)"),
    "bench": (_bench, "benchmark an OpenAI-compatible endpoint (ferry bench --help)"),
    "profile": (_profile, "measure the engine and write its sim profile YAML (ferry profile --help)"),
    "sim": (_sim, "simulate a cluster over a trace with the live policies (ferry sim --help)"),
    "admin": (_admin, "operate a running scheduler: instances, drain, preempt (ferry admin --help); api-key create; tls create"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ferry", description="Ferry: an LLM-serving control plane.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        handler, _ = COMMANDS[argv[0]]
        return handler(argv[1:])
    build_parser().parse_args(argv)  # prints help or a usage error and exits
    return 2


if __name__ == "__main__":
    sys.exit(main())
