"""Mutual TLS between Ferry's processes: every gRPC call encrypted, and both ends proven by a certificate.

Off unless FERRY_TLS_DIR names a folder. The folder holds what a Kubernetes TLS Secret holds (the layout
cert-manager writes, and the chart's `serviceTLS` Secret):

    ca.crt    the certificate authority every peer's certificate must chain to
    tls.crt   this process's certificate (PEM, with intermediates after it)
    tls.key   its private key

Servers accept only clients presenting a certificate of that CA; channels present theirs and accept only
a server whose certificate chains to the CA and names SERVER_NAME. Peers are checked by CA and that one
name, not by address: pods move and their IPs change, so a channel asks for SERVER_NAME whatever address
it dials (gRPC's ssl_target_name_override). Any certificate of the CA may serve and call: identity is
"holds a key the cluster's CA signed", the same trust the shared token gives (service_auth.py), plus
encryption. Both can be on at once.

One env var, like the token: every process a platform starts (services, workers, `ferry admin`, the
operator, Ray replicas) picks it up. Files are read when a channel or server is made: rotate by
replacing them and restarting. `ferry admin tls create DIR` makes a CA and a certificate for a closed
deployment; `ferry up --service-tls` makes them for one stack.
"""
from __future__ import annotations

import argparse
import datetime
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

from services.common import service_auth

TLS_DIR_ENV = "FERRY_TLS_DIR"
SERVER_NAME = "ferry"                   # the DNS name (SAN) every certificate carries and every channel asks for
FILES = ("ca.crt", "tls.crt", "tls.key")
CHANNEL_OPTIONS = [("grpc.ssl_target_name_override", SERVER_NAME)]


@dataclass(frozen=True)
class TlsFiles:
    ca: bytes
    cert: bytes
    key: bytes


def read_folder(folder: str | os.PathLike) -> TlsFiles:
    """The three files of `folder`. Raises ValueError naming what is missing (never a key's content)."""
    contents = []
    for name in FILES:
        path = Path(folder) / name
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ValueError(f"{TLS_DIR_ENV} {folder}: cannot read {name} ({e.strerror or e}); the folder must "
                             f"hold {', '.join(FILES)} (`ferry admin tls create DIR` makes them)") from None
        if b"-----BEGIN" not in data:
            raise ValueError(f"{TLS_DIR_ENV} {folder}: {name} is not PEM")
        contents.append(data)
    return TlsFiles(*contents)


def configured() -> TlsFiles | None:
    """The files of FERRY_TLS_DIR, or None when mutual TLS is off (the variable unset or empty)."""
    folder = os.environ.get(TLS_DIR_ENV, "")
    return read_folder(folder) if folder else None


def use_folder(folder: str | os.PathLike) -> None:
    """Turn mutual TLS on for this process and the processes it starts (sets the env var)."""
    read_folder(folder)                                 # fail now, naming the file, not at the first call
    os.environ[TLS_DIR_ENV] = str(Path(folder).resolve())


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([(files.key, files.cert)], root_certificates=files.ca,
                                       require_client_auth=True)


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=files.ca, private_key=files.key,
                                        certificate_chain=files.cert)


# ---- ferry admin tls create ----------------------------------------------------------------------------
def create(folder: Path, days: int = 365) -> None:
    """A new CA and one certificate it signs (for SERVER_NAME, server and client use) in `folder`;
    keys mode 0600. The CA's own key is not kept: nothing more can be signed with it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("ferry-ca")).issuer_name(name("ferry-ca"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(name(SERVER_NAME)).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(SERVER_NAME)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    (folder / "ca.crt").write_bytes(ca.public_bytes(pem))
    (folder / "tls.crt").write_bytes(cert.public_bytes(pem))
    service_auth.write_secret_file(folder / "tls.key", key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ferry admin tls", description="Certificates for mutual TLS between "
                                     f"Ferry's processes ({TLS_DIR_ENV}; services/common/service_tls.py).")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    make = sub.add_parser("create", help="write a new CA and a certificate it signs: DIR/ca.crt, tls.crt, tls.key")
    make.add_argument("folder", type=Path, metavar="DIR")
    make.add_argument("--days", type=int, default=365, help="validity (default: 365)")
    args = parser.parse_args(argv)
    if args.days <= 0:
        parser.error(f"--days must be > 0, got {args.days}")
    if any((args.folder / f).exists() for f in FILES):
        parser.error(f"{args.folder} already holds certificates: choose another folder or remove them")
    create(args.folder, args.days)
    print(f"Wrote {', '.join(str(args.folder / f) for f in FILES)}.\n"
          f"Give every Ferry process {TLS_DIR_ENV}={args.folder.resolve()} (the same files on every machine).")
    return 0
