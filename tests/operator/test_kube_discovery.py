"""The operator's API client discovers the server's resources without writing to the disk."""
from __future__ import annotations

import tempfile

import pytest
from kubernetes import config

from operators.ferry_operator.kube import Kube

pytestmark = pytest.mark.e2e


def test_discovery_writes_no_cache_file(kube_cluster, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    kube = Kube(config.new_client_from_config(str(kube_cluster.kubeconfig)))
    assert kube.pdb_api_version.startswith("policy/")
    assert kube.dyn.resources.get(api_version="v1", kind="ConfigMap").name == "configmaps"
    assert list(tmp_path.iterdir()) == [], "the stock discoverer writes /tmp/osrcp-<md5>.json"
