"""Mutual TLS in process: certificates from `ferry admin tls create`, a grpc_util server and channels with
FERRY_TLS_DIR set. A channel of the same CA gets through; plaintext, no client certificate, or another
CA's certificate do not; a folder that cannot be used stops a service at start, naming the file."""
from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
import sys
import tempfile

import grpc
import pytest
from cryptography import x509

from services.common import grpc_util, service_tls
from services.common.settings import parse_settings
from services.kvstore.main import KVStoreSettings
from services.platforms.local import build_parser
from services.platforms.stack_auth import admin_env, configure
from tests.procs import ROOT
from tests.security.test_service_auth import _echo_handlers


@pytest.fixture
async def server(certs, monkeypatch):
    """An echo server from grpc_util with FERRY_TLS_DIR set: its address."""
    monkeypatch.setenv(service_tls.TLS_DIR_ENV, str(certs[0]))
    srv = grpc_util.aio_server()
    srv.add_generic_rpc_handlers(_echo_handlers([]))
    port = grpc_util.bind(srv, "127.0.0.1", 0)
    await srv.start()
    yield f"127.0.0.1:{port}"
    await srv.stop(None)


async def echo(channel: grpc.aio.Channel) -> bytes:
    return await channel.unary_unary("/t.Echo/unary_unary")(b"ab", timeout=5)


def test_created_files_are_a_ca_and_a_certificate_for_the_service_name(certs):
    ours = certs[0]
    ca = x509.load_pem_x509_certificate((ours / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((ours / "tls.crt").read_bytes())
    assert cert.issuer == ca.subject
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
        .get_values_for_type(x509.DNSName) == [service_tls.SERVER_NAME]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert stat.S_IMODE((ours / "tls.key").stat().st_mode) == 0o600


async def test_a_channel_of_the_same_ca_gets_through_whatever_address_it_dials(server):
    async with grpc_util.aio_channel(server) as channel:
        assert await echo(channel) == b"ab"
    localhost = server.replace("127.0.0.1", "localhost")       # the name checked is SERVER_NAME, not the host
    async with grpc_util.aio_channel(localhost) as channel:
        assert await echo(channel) == b"ab"


async def test_the_blocking_channel_speaks_tls_too(server):
    def call() -> bytes:
        with grpc_util.channel(server) as channel:
            return channel.unary_unary("/t.Echo/unary_unary")(b"ab", timeout=5)
    assert await asyncio.to_thread(call) == b"ab"


async def test_plaintext_is_refused(server):
    async with grpc.aio.insecure_channel(server) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await echo(channel)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_client_without_a_certificate_is_refused(server, certs):
    ca = (certs[0] / "ca.crt").read_bytes()
    credentials = grpc.ssl_channel_credentials(root_certificates=ca)           # trusts the server, shows nothing
    async with grpc.aio.secure_channel(server, credentials, options=service_tls.CHANNEL_OPTIONS) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await echo(channel)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_certificate_of_another_ca_is_refused_both_ways(server, certs, monkeypatch):
    monkeypatch.setenv(service_tls.TLS_DIR_ENV, str(certs[1]))                 # the client's, after the server's
    async with grpc_util.aio_channel(server) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await echo(channel)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("broken, message", [("missing", "cannot read tls.key"), ("garbage", "tls.crt is not PEM")])
def test_an_unusable_folder_stops_a_service_at_start_naming_the_file(certs, tmp_path, monkeypatch, broken, message):
    monkeypatch.setenv(service_tls.TLS_DIR_ENV, "")
    for name in service_tls.FILES:
        (tmp_path / name).write_bytes((certs[0] / name).read_bytes())
    if broken == "missing":
        (tmp_path / "tls.key").unlink()
    else:
        (tmp_path / "tls.crt").write_text("not a certificate")
    with pytest.raises(SystemExit) as e:
        parse_settings(KVStoreSettings, ["--tls-dir", str(tmp_path)], prog="ferry serve kvstore")
    assert message in str(e.value) and "BEGIN" not in str(e.value)


def test_tls_dir_flag_turns_it_on_for_the_process_and_its_children(certs, monkeypatch):
    monkeypatch.setenv(service_tls.TLS_DIR_ENV, "")         # restored (unset) after the test
    parse_settings(KVStoreSettings, ["--tls-dir", str(certs[0])], prog="ferry serve kvstore")
    assert os.environ[service_tls.TLS_DIR_ENV] == str(certs[0].resolve())


def test_admin_tls_create_writes_a_folder_and_refuses_to_overwrite(tmp_path):
    def admin(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "services.cli", "admin", "tls", "create", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=60, check=False)
    made = admin(str(tmp_path / "certs"), "--days", "30")
    assert made.returncode == 0 and service_tls.TLS_DIR_ENV in made.stdout, made.stderr
    service_tls.read_folder(tmp_path / "certs")
    again = admin(str(tmp_path / "certs"))
    assert again.returncode == 2 and "already holds certificates" in again.stderr
    assert admin(str(tmp_path / "other"), "--days", "0").returncode == 2


def test_ferry_up_service_tls_makes_a_ca_and_certificate_in_the_log_dir(monkeypatch, tmp_path):
    monkeypatch.setenv(service_tls.TLS_DIR_ENV, "")         # restored after the test
    assert configure(build_parser().parse_args(["--service-tls"]), tmp_path) is None   # nothing temporary
    assert os.environ[service_tls.TLS_DIR_ENV] == str((tmp_path / "tls").resolve())
    assert stat.S_IMODE((tmp_path / "tls" / "tls.key").stat().st_mode) == 0o600
    first = (tmp_path / "tls" / "ca.crt").read_bytes()
    configure(build_parser().parse_args(["--service-tls"]), tmp_path)       # the log dir again: new ones
    assert (tmp_path / "tls" / "ca.crt").read_bytes() != first
    assert service_tls.TLS_DIR_ENV in admin_env()


def test_ferry_up_without_a_log_dir_keeps_generated_secrets_in_one_temp_folder(monkeypatch):
    monkeypatch.setenv(service_tls.TLS_DIR_ENV, "")
    monkeypatch.setenv("FERRY_SERVICE_TOKEN_FILE", "")
    made = configure(build_parser().parse_args(["--platform", "ray", "--service-tls", "--service-auth"]), None)
    try:
        assert sorted(p.name for p in made.iterdir()) == ["service-token", "tls"]
    finally:
        shutil.rmtree(made)


def test_ferry_up_removes_what_it_made_when_a_later_setting_is_unusable(monkeypatch, tmp_path):
    monkeypatch.setenv("FERRY_SERVICE_TOKEN_FILE", "")
    monkeypatch.setenv(service_tls.TLS_DIR_ENV, "")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    tempfile.tempdir = None                                  # re-read TMPDIR
    try:
        with pytest.raises(ValueError, match="cannot read ca.crt"):
            configure(build_parser().parse_args(["--platform", "ray", "--service-auth",
                                                 "--tls-dir", str(tmp_path / "missing")]), None)
    finally:
        tempfile.tempdir = None
    assert list(tmp_path.iterdir()) == []                    # the token's temp folder went too
