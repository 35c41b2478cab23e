#!/usr/bin/env bash
# `make e2e-kind`: the e2e tests on a kind cluster instead of the local control plane. Needs docker
# and kind on PATH (users' CI; this project's own machines have no container engine, so this script is
# not run there). The models/ folder is mounted into every node at the same path, which is what the
# tests' chart values point the model volume at (tests/kube/cluster.py: helm_values).
set -euo pipefail
cd "$(dirname "$0")/../.."
CLUSTER="${KIND_CLUSTER:-ferry-e2e}"
TAG="${FERRY_IMAGE_TAG:-0.1.0}"
config="$(mktemp)"; trap 'rm -f "$config"' EXIT
cat > "$config" <<YAML
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
- role: control-plane
  extraMounts: [{hostPath: "$PWD/models", containerPath: "$PWD/models", readOnly: true}]
- role: worker
  extraMounts: [{hostPath: "$PWD/models", containerPath: "$PWD/models", readOnly: true}]
YAML
kind get clusters | grep -qx "$CLUSTER" || kind create cluster --name "$CLUSTER" --config "$config"
docker build -f docker/Dockerfile -t "ghcr.io/ferry-serving/ferry:$TAG" .
# kind nodes have no GPU: a CPU torch build (TORCH_INDEX_URL: PyTorch's CPU wheel index, from the caller)
docker build -f docker/Dockerfile.worker --build-arg TORCH_VARIANT=cpu \
  --build-arg TORCH_INDEX_URL="${TORCH_INDEX_URL:?set TORCH_INDEX_URL to PyTorch's CPU wheel index}" -t "ghcr.io/ferry-serving/ferry-worker:$TAG" .
kind load docker-image --name "$CLUSTER" "ghcr.io/ferry-serving/ferry:$TAG" "ghcr.io/ferry-serving/ferry-worker:$TAG"
export KUBECONFIG="${KUBECONFIG_KIND:-$(mktemp)}"
kind get kubeconfig --name "$CLUSTER" > "$KUBECONFIG"
# helm and kubectl from PATH (no need for the local control plane's build)
bin="$(mktemp -d)"; ln -s "$(command -v helm)" "$bin/helm"; ln -s "$(command -v kubectl)" "$bin/kubectl"
FERRY_K8S_BIN="$bin" HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -m e2e
