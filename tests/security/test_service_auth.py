"""Service authentication in process: the token check on every kind of call, the channels that send it
(grpc.aio and blocking), the open health methods, and the plumbing that turns it on (env, flag, ferry up)."""
from __future__ import annotations

import os
import stat

import grpc
import pytest

from services.common import grpc_util, service_auth
from services.common.settings import parse_settings
from services.platforms.local import build_parser
from services.platforms.stack_auth import configure

TOKEN = "s3cret-token_value"
KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


def _echo_handlers(calls: list[str]) -> grpc.GenericRpcHandler:
    """/t.Echo/<kind> for each call kind, and an open /grpc.health.v1.Health/Check; bytes in, bytes out."""
    async def unary_unary(request, context):
        calls.append("unary_unary")
        return request

    async def unary_stream(request, context):
        calls.append("unary_stream")
        yield request[:1]
        yield request[1:]

    async def stream_unary(requests, context):
        calls.append("stream_unary")
        return b"".join([r async for r in requests])

    async def stream_stream(requests, context):
        calls.append("stream_stream")
        async for r in requests:
            yield r

    echo = grpc.method_handlers_generic_handler("t.Echo", {
        "unary_unary": grpc.unary_unary_rpc_method_handler(unary_unary),
        "unary_stream": grpc.unary_stream_rpc_method_handler(unary_stream),
        "stream_unary": grpc.stream_unary_rpc_method_handler(stream_unary),
        "stream_stream": grpc.stream_stream_rpc_method_handler(stream_stream)})
    health = grpc.method_handlers_generic_handler("grpc.health.v1.Health", {
        "Check": grpc.unary_unary_rpc_method_handler(unary_unary)})
    return echo, health


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture
def auth_on(monkeypatch, token_file):
    monkeypatch.setenv(service_auth.TOKEN_FILE_ENV, str(token_file))
    return token_file


@pytest.fixture
async def server(auth_on):
    """An echo server made by grpc_util.aio_server() with the token configured: (address, calls)."""
    calls: list[str] = []
    srv = grpc_util.aio_server()
    srv.add_generic_rpc_handlers(_echo_handlers(calls))
    port = grpc_util.bind(srv, "127.0.0.1", 0)
    await srv.start()
    yield f"127.0.0.1:{port}", calls
    await srv.stop(None)


async def _call(channel: grpc.aio.Channel, kind: str, metadata=None, requests=(b"a", b"b")) -> bytes:
    method = getattr(channel, kind)(f"/t.Echo/{kind}")
    if kind == "unary_unary":
        return await method(b"ab", metadata=metadata, timeout=5)
    if kind == "unary_stream":
        return b"".join([r async for r in method(b"ab", metadata=metadata, timeout=5)])
    if kind == "stream_unary":
        return await method(iter(requests), metadata=metadata, timeout=5)
    return b"".join([r async for r in method(iter(requests), metadata=metadata, timeout=5)])


@pytest.mark.parametrize("kind", KINDS)
async def test_a_channel_with_the_token_gets_through(server, kind):
    address, calls = server
    async with grpc_util.aio_channel(address) as channel:
        assert await _call(channel, kind) == b"ab"
    assert calls == [kind]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("metadata", [None, (("authorization", "Bearer wrong"),), (("authorization", TOKEN),),
                                      (("authorization", f"Bearer {TOKEN}x"),), (("x-token", f"Bearer {TOKEN}"),)],
                         ids=["none", "wrong", "no-scheme", "longer", "other-header"])
async def test_a_call_without_the_right_token_is_refused_before_the_servicer_runs(server, kind, metadata):
    address, calls = server
    async with grpc.aio.insecure_channel(address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            # No request messages: a client still writing when the server ends the call may see grpcio's
            # INTERNAL "Failed execute_batch" (its send failed) before the UNAUTHENTICATED status.
            await _call(channel, kind, metadata, requests=())
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert TOKEN not in (e.value.details() or "")
    assert calls == []


async def test_an_explicit_right_header_on_a_plain_channel_gets_through(server):
    address, _ = server
    async with grpc.aio.insecure_channel(address) as channel:
        assert await _call(channel, "unary_unary", (("authorization", f"Bearer {TOKEN}"),)) == b"ab"


async def test_health_checks_stay_open(server):
    address, calls = server
    async with grpc.aio.insecure_channel(address) as channel:
        assert await channel.unary_unary("/grpc.health.v1.Health/Check")(b"ok", timeout=5) == b"ok"
    assert calls == ["unary_unary"]


async def test_the_blocking_channel_sends_the_token_too(server):
    address, _ = server

    def call() -> bytes:
        with grpc_util.channel(address) as channel:
            return channel.unary_unary("/t.Echo/unary_unary")(b"ab", timeout=5)

    import asyncio
    assert await asyncio.to_thread(call) == b"ab"


async def test_without_the_env_var_nothing_is_checked(monkeypatch):
    monkeypatch.setenv(service_auth.TOKEN_FILE_ENV, "")  # restored after the test
    calls: list[str] = []
    srv = grpc_util.aio_server()
    srv.add_generic_rpc_handlers(_echo_handlers(calls))
    port = grpc_util.bind(srv, "127.0.0.1", 0)
    await srv.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert await _call(channel, "stream_stream") == b"ab"
    finally:
        await srv.stop(None)


@pytest.mark.parametrize("metadata, ok", [
    ((("authorization", f"Bearer {TOKEN}"),), True),
    ((("Authorization", f"Bearer {TOKEN}"),), True),
    ((("authorization", f"Bearer {TOKEN}".encode()),), True),
    ((("authorization", f"bearer {TOKEN}"),), False),
    ((("authorization", f"Bearer {TOKEN[:-1]}"),), False),
    ((), False),
    (None, False),
])
def test_is_authorized(metadata, ok):
    assert service_auth.is_authorized(metadata, TOKEN) is ok


@pytest.mark.parametrize("content, problem", [("", "empty"), ("  \n", "empty"), ("two words", "one line")])
def test_an_unusable_token_file_is_refused_naming_the_file(tmp_path, content, problem):
    path = tmp_path / "token"
    path.write_text(content)
    with pytest.raises(ValueError, match=problem) as e:
        service_auth.read_token(path)
    assert str(path) in str(e.value)


def test_a_missing_token_file_is_refused(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        service_auth.read_token(tmp_path / "nope")


def test_the_interceptors_never_show_the_token():
    for obj in (service_auth.TokenServerInterceptor(TOKEN), *service_auth.client_interceptors(TOKEN),
                service_auth.SyncTokenClientInterceptor(TOKEN)):
        assert TOKEN not in repr(obj) and TOKEN not in str(obj)


def test_the_settings_flag_turns_it_on_for_this_process_and_its_children(monkeypatch, token_file):
    from services.kvstore.main import KVStoreSettings

    monkeypatch.setenv(service_auth.TOKEN_FILE_ENV, "")  # restored after the test
    parse_settings(KVStoreSettings, ["--service-token-file", str(token_file)], prog="t", env_prefix="FERRY_KVSTORE_")
    assert os.environ[service_auth.TOKEN_FILE_ENV] == str(token_file.resolve())
    assert service_auth.configured_token() == TOKEN


def test_a_service_with_a_bad_token_file_does_not_start(monkeypatch, tmp_path):
    from services.kvstore.main import KVStoreSettings

    monkeypatch.setenv(service_auth.TOKEN_FILE_ENV, str(tmp_path / "missing"))
    with pytest.raises(SystemExit, match="missing"):
        parse_settings(KVStoreSettings, [], prog="t", env_prefix="FERRY_KVSTORE_")


def test_ferry_up_service_auth_makes_a_private_token_in_the_log_dir(monkeypatch, tmp_path):
    monkeypatch.setenv(service_auth.TOKEN_FILE_ENV, "")  # restored after the test
    configure(build_parser().parse_args(["--service-auth"]), tmp_path)
    path = tmp_path / "service-token"
    assert os.environ[service_auth.TOKEN_FILE_ENV] == str(path.resolve())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(service_auth.configured_token()) >= 32


def test_ferry_up_is_unchanged_without_the_flags(monkeypatch, tmp_path):
    monkeypatch.setenv(service_auth.TOKEN_FILE_ENV, "")  # restored after the test
    configure(build_parser().parse_args([]), tmp_path)
    assert not os.environ[service_auth.TOKEN_FILE_ENV] and not (tmp_path / "service-token").exists()
