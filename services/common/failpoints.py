"""Fault injection for tests of failure paths: `FERRY_FAILPOINTS="name=seconds,…"` makes
`await pause("name")` sleep that long in the process that has it set (nothing happens otherwise).

    FERRY_FAILPOINTS="pushkv.stage0=5"   a worker that takes 5 s before importing a stage 0, so a test
                                         can kill it while a migration's first stage is in flight

Points: pushkv.stage0 (a first, non-final KV stage arrived), pushkv.final (a final stage arrived).
Unknown names in the variable are an error at the first `pause`, so a typo fails loudly.
"""
from __future__ import annotations

import asyncio
import functools
import os

POINTS = ("pushkv.stage0", "pushkv.final")


@functools.cache
def _configured() -> dict[str, float]:
    spec = os.environ.get("FERRY_FAILPOINTS", "")
    points = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, seconds = item.partition("=")
        if name not in POINTS:
            raise ValueError(f"FERRY_FAILPOINTS: unknown point {name!r}; known: {', '.join(POINTS)}")
        points[name] = float(seconds)
    return points


async def pause(name: str) -> None:
    seconds = _configured().get(name)
    if seconds:
        await asyncio.sleep(seconds)
