"""Process lifecycle for `ferry serve <service>`: logging, signals, graceful shutdown.

    run_service(name, serve)      serve(stop: asyncio.Event) runs until SIGINT/SIGTERM sets `stop`

A service starts its servers, awaits `stop.wait()`, then closes them (with a grace period) before
returning. A second signal exits at once.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable


def setup_logging(name: str) -> logging.Logger:
    level = os.environ.get("FERRY_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s {name} %(name)s: %(message)s")
    return logging.getLogger(f"ferry.{name}")


def run_service(name: str, serve: Callable[[asyncio.Event], Awaitable[None]]) -> int:
    setup_logging(name)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            if stop.is_set():
                os._exit(130)
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        await serve(stop)

    try:
        asyncio.run(main())
    except OSError as e:          # e.g. the port is taken: say so, no traceback
        print(f"ferry {name}: {e}", file=sys.stderr)
        return 1
    return 0
