"""Fixtures of the security tests."""
from __future__ import annotations

import pytest

from services.common import service_tls


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    """Two independent CAs, each with a certificate it signed (`ferry admin tls create`): the folders
    ("ours", "theirs")."""
    root = tmp_path_factory.mktemp("tls")
    for name in ("ours", "theirs"):
        service_tls.create(root / name)
    return root / "ours", root / "theirs"
