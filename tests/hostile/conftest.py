"""One sim-engine stack (1 prefill + 1 decode worker, no model weights) shared by the hostile-input
tests: it starts in seconds, and every service in it parses the same wire formats as a model stack."""
from __future__ import annotations

import pytest

from tests.integration.conftest import pytest_runtest_makereport  # noqa: F401 (log tails on failure)
from tests.integration.stack import Shape, Stack, start_stack


def arg(stack: Stack, name: str, flag: str) -> str:
    """The value of `flag` on the command line `stack` started `name` with."""
    args = list(stack.procs[name].args)
    return args[args.index(flag) + 1]


@pytest.fixture(scope="session")
def sim_stack(tmp_path_factory, smollm2_path):
    stack = start_stack("hostile", tmp_path_factory.mktemp("hostile"), smollm2_path,
                        shape=Shape(engine="sim"))
    yield stack
    stack.stop()


@pytest.fixture(scope="session")
def kvstore_address(sim_stack) -> str:
    return f"127.0.0.1:{arg(sim_stack, 'kvstore', '--port')}"


@pytest.fixture(scope="session")
def sink_address(sim_stack) -> str:
    return f"127.0.0.1:{arg(sim_stack, 'gateway', '--sink-port')}"


@pytest.fixture(scope="session")
def worker_addresses(sim_stack) -> dict[str, str]:
    """role name ("prefill", "decode") -> address."""
    from services.gen.ferry.v1 import common_pb2
    names = {common_pb2.ROLE_PREFILL: "prefill", common_pb2.ROLE_DECODE: "decode"}
    return {names[s.instance.role]: s.instance.address for s in sim_stack.instances()}
