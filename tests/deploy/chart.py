"""Helpers of the chart tests: find helm, render the chart, read the CRD (no cluster needed)."""
from __future__ import annotations

import os
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "ferry"
CRD_FILE = CHART / "crds" / "inferenceclusters.serving.ferry.dev.yaml"
TOOLCHAIN_BIN = Path.home() / ".cache" / "ferry" / "k8s" / "v1.20.2" / "bin"
RELEASE, NAMESPACE = "ferry", "serving"
MONITORING = ("--api-versions", "monitoring.coreos.com/v1")


def tool(name: str) -> Path | None:
    """`name` from $FERRY_K8S_BIN, else the toolchain cache (tests/e2e/toolchain.sh), else PATH."""
    for folder in (os.environ.get("FERRY_K8S_BIN"), str(TOOLCHAIN_BIN)):
        if folder and (Path(folder) / name).is_file():
            return Path(folder) / name
    found = shutil.which(name)
    return Path(found) if found else None


def helm_path() -> Path:
    path = tool("helm")
    if path is None:
        pytest.skip(f"no helm binary: set FERRY_K8S_BIN or run `make k8s-toolchain` "
                    f"(it puts helm in {TOOLCHAIN_BIN})")
    return path


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(helm_path()), *args], check=False, capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def template_text(*args: str) -> str:
    return helm("template", RELEASE, str(CHART), "-n", NAMESPACE, *args).stdout


@cache
def render(*args: str) -> tuple[dict, ...]:
    """The objects `helm template` renders with these extra arguments (cached: the chart is static)."""
    return tuple(d for d in yaml.safe_load_all(template_text(*args)) if d)


def find(objects, kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]


def one(objects, kind: str, name: str | None = None) -> dict:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def pod_specs(objects) -> list[tuple[str, dict]]:
    """(workload name, pod spec) of every workload the chart renders."""
    kinds = ("Deployment", "StatefulSet", "DaemonSet", "Job")
    return [(o["metadata"]["name"], o["spec"]["template"]["spec"]) for o in objects if o["kind"] in kinds]


@cache
def crd() -> dict:
    return yaml.safe_load(CRD_FILE.read_text())


def crd_spec_schema() -> dict:
    return crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
