"""Real Ferry stacks on loopback, shared by the integration tests (see stack.py).

    disagg_stack     (session)  1 prefill + 1 decode worker
    colocated_stack  (module)   1 `--role both` worker (the baseline)
    reference        (session)  the in-process `LLMEngine` on the same model, for greedy parity

Every process runs in its own process group and is stopped by PID in the finalizer; logs go to
pytest's temporary folders, and a failing test gets the tails of its stack's logs in its report.
"""
from __future__ import annotations

import pytest

from tests.integration.stack import Reference, Stack, start_stack


@pytest.fixture(scope="session")
def disagg_stack(tmp_path_factory, smollm2_path):
    stack = start_stack("disagg", tmp_path_factory.mktemp("disagg"), smollm2_path, colocated=False)
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def colocated_stack(tmp_path_factory, smollm2_path):
    stack = start_stack("colocated", tmp_path_factory.mktemp("colocated"), smollm2_path, colocated=True)
    yield stack
    stack.stop()


@pytest.fixture(scope="session")
def reference(smollm2_path) -> Reference:
    return Reference(smollm2_path)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test shows the last lines of every log of the stacks it used."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and report.when in ("setup", "call"):
        for value in getattr(item, "funcargs", {}).values():
            if isinstance(value, Stack):
                report.sections.append((f"{value.name} stack logs", value.tails()))

