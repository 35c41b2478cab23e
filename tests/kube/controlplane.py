"""A real Kubernetes control plane as local processes on loopback, for the operator and e2e tests.

    etcd ── kube-apiserver (TLS on 127.0.0.1, token auth, RBAC) ── kube-controller-manager
                                                                └── kube-scheduler

The binaries are Kubernetes v1.20.2 built from Debian's source package by tests/e2e/toolchain.sh
(cached); etcd is Debian's. Everything lives in one temporary directory that `stop()` removes:
certificates (a throw-away CA, the API server's serving certificate, the service-account key),
the token file, etcd's data and each process's log. There is no kubelet: tests/kube/kubelet.py
plays one.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from tests.procs import free_port

ROOT = Path(__file__).resolve().parents[2]
TOOLCHAIN = ROOT / "tests" / "e2e" / "toolchain.sh"
SERVICE_CIDR = "10.0.0.0/24"     # allocated to Services only; nothing here routes to it


def toolchain_bin() -> Path:
    """The cached bin directory (helm, kubectl, kube-*), built on first use (minutes, once)."""
    env = {**os.environ, "PYTHON": str(ROOT / ".venv" / "bin" / "python")}
    out = subprocess.run(["bash", str(TOOLCHAIN)], env=env, check=True, stdout=subprocess.PIPE, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem_key(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def _cert(subject: str, key, issuer_name: x509.Name | None, issuer_key, *, ca: bool,
          sans: list[x509.GeneralName] = ()) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name or name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass
class ControlPlane:
    """Start with `start()`, stop with `stop()` (idempotent); `kubeconfig` is cluster-admin."""
    bin_dir: Path
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ferry-k8s-")))
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    apiserver_port: int = 0
    admin_token: str = field(default_factory=lambda: secrets.token_hex(16))
    # the `kubernetes` Service's address for in-cluster clients (the test kubelet forwards its :443)
    service_ip: str = field(default_factory=lambda: f"127.{secrets.randbelow(200) + 20}.{secrets.randbelow(256)}.1")

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.apiserver_port}"

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "admin.kubeconfig"

    @property
    def ca_file(self) -> Path:
        return self.workdir / "pki" / "ca.crt"

    def start(self, timeout: float = 90.0) -> ControlPlane:
        try:
            self._write_pki()
            self._start_etcd()
            self._start_apiserver(timeout)
            self._start("kube-controller-manager", [
                f"--kubeconfig={self.kubeconfig}", "--leader-elect=false", "--port=0", "--secure-port=0",
                # no nodelifecycle: the test kubelet's nodes never go stale; no endpoint controller:
                # Endpoints reject the loopback pod IPs the test kubelet hands out (it resolves
                # Services itself).
                "--controllers=deployment,replicaset,garbagecollector,namespace,disruption,serviceaccount",
                f"--service-account-private-key-file={self.workdir / 'pki' / 'sa.key'}",
                f"--root-ca-file={self.ca_file}", "--concurrent-gc-syncs=5"])
            self._start("kube-scheduler", [f"--kubeconfig={self.kubeconfig}", "--leader-elect=false",
                                           "--port=0", "--secure-port=0"])
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for name in ("kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # --- pieces -------------------------------------------------------------------------------------
    def _write_pki(self) -> None:
        pki = self.workdir / "pki"
        pki.mkdir(parents=True)
        ca_key = _key()
        ca = _cert("ferry-test-ca", ca_key, None, ca_key, ca=True)
        server_key = _key()
        sans = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address(self.service_ip)),
                x509.DNSName("localhost"),
                *(x509.DNSName(n) for n in ("kubernetes", "kubernetes.default", "kubernetes.default.svc",
                                            "kubernetes.default.svc.cluster.local"))]
        server = _cert("kube-apiserver", server_key, ca.subject, ca_key, ca=False, sans=sans)
        (pki / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        (pki / "apiserver.crt").write_bytes(server.public_bytes(serialization.Encoding.PEM))
        (pki / "apiserver.key").write_bytes(_pem_key(server_key))
        sa_key = _key()
        (pki / "sa.key").write_bytes(_pem_key(sa_key))
        (pki / "sa.pub").write_bytes(sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        (pki / "tokens.csv").write_text(f'{self.admin_token},ferry-admin,ferry-admin,"system:masters"\n')

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        exe = shutil.which(name) if name == "etcd" else str(self.bin_dir / name)
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 (the child owns it)
        proc = subprocess.Popen([exe, *args], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        self.procs[name] = proc
        return proc

    def _start_etcd(self) -> None:
        client, peer = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client}"
        self._start("etcd", [
            f"--data-dir={self.workdir / 'etcd'}", f"--listen-client-urls={self.etcd_url}",
            f"--advertise-client-urls={self.etcd_url}", f"--listen-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=default=http://127.0.0.1:{peer}", "--log-level=warn",
            "--quota-backend-bytes=1073741824"])

    def _start_apiserver(self, timeout: float) -> None:
        pki = self.workdir / "pki"
        self.apiserver_port = free_port()
        proc = self._start("kube-apiserver", [
            f"--etcd-servers={self.etcd_url}", "--bind-address=127.0.0.1", f"--secure-port={self.apiserver_port}",
            "--insecure-port=0", f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}", f"--client-ca-file={pki / 'ca.crt'}",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}", f"--token-auth-file={pki / 'tokens.csv'}",
            "--authorization-mode=Node,RBAC", f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--allow-privileged=true", "--disable-admission-plugins=ServiceAccount",
            "--endpoint-reconciler-type=none", "--advertise-address=127.0.0.1"])
        self._write_kubeconfig()
        self._wait_ready(proc, timeout)

    def _write_kubeconfig(self) -> None:
        self.kubeconfig.write_text(kubeconfig_text(self.server, self.ca_file, self.admin_token, "ferry-admin"))

    def _wait_ready(self, proc: subprocess.Popen, timeout: float) -> None:
        import ssl
        import urllib.request

        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"kube-apiserver exited ({proc.returncode}):\n{self.log('kube-apiserver')[-3000:]}")
            req = urllib.request.Request(f"{self.server}/readyz",
                                         headers={"Authorization": f"Bearer {self.admin_token}"})
            try:
                with urllib.request.urlopen(req, context=ctx, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"kube-apiserver not ready after {timeout} s:\n{self.log('kube-apiserver')[-3000:]}")


def kubeconfig_text(server: str, ca_file: Path, token: str, user: str, namespace: str = "default") -> str:
    return f"""apiVersion: v1
kind: Config
clusters:
- name: ferry-test
  cluster: {{server: "{server}", certificate-authority: "{ca_file}"}}
users:
- name: {user}
  user: {{token: "{token}"}}
contexts:
- name: ferry-test
  context: {{cluster: ferry-test, user: {user}, namespace: {namespace}}}
current-context: ferry-test
"""
