"""The colocated baseline (one `--role both` worker, no hand-off) gives the in-process engine's output."""
from __future__ import annotations

import pytest

from tests.integration.stack import check_greedy_parity

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_colocated_greedy_output_equals_the_in_process_engine(colocated_stack, reference, kind, stream):
    check_greedy_parity(colocated_stack, reference, kind, stream)
