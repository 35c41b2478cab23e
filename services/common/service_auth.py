"""Service-to-service authentication: one shared bearer token on every gRPC call between Ferry processes.

Off unless a token file is configured. The switch is one env var, so every process a platform starts
(services, workers, `ferry admin`, the operator, Ray replicas) picks it up without a flag threaded
through each launcher; `--service-token-file PATH` on any `ferry serve` sets the same variable:

    FERRY_SERVICE_TOKEN_FILE=/etc/ferry/service-token/token     (a file holding the token; whitespace
                                                                 around it is ignored; mode 0600 advised)

    client ──(metadata  authorization: Bearer <token>)──▶ server interceptor
                                                           ├─ equal (constant-time)  → the servicer
                                                           ├─ grpc.health.v1.Health  → the servicer (open)
                                                           └─ else → UNAUTHENTICATED, servicer never runs

Clients attach the header with an interceptor rather than call credentials: call credentials need a
TLS channel, and these channels are plaintext (mutual TLS would be the next step; the token alone
stops an unauthenticated peer on the network from calling Drain, PushKV, Route...). The token never
appears in logs or error messages: they name the file, not its content.
"""
from __future__ import annotations

import collections
import hmac
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

TOKEN_FILE_ENV = "FERRY_SERVICE_TOKEN_FILE"
HEADER = "authorization"
SCHEME = "Bearer "
# Methods callable without the token: standard gRPC health checks (kubelet/grpc_health_probe style
# probes carry no credentials). Ferry registers no health service today; the gap is kept deliberately.
OPEN_METHOD_PREFIXES: tuple[str, ...] = ("/grpc.health.v1.Health/",)
DENIED_DETAILS = "missing or wrong service token (see FERRY_SERVICE_TOKEN_FILE)"


def read_token(path: str | os.PathLike) -> str:
    """The token in `path`, stripped. Raises ValueError naming the file (never the content) if unusable."""
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise ValueError(f"service token file {path}: cannot read it ({e.strerror or e})") from None
    if not token:
        raise ValueError(f"service token file {path} is empty: write a random token into it "
                         "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    if any(c.isspace() for c in token) or not token.isprintable():
        raise ValueError(f"service token file {path}: the token must be one line of printable, non-space characters")
    return token


def write_secret_file(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` readable by its owner alone (mode 0600, also when the file was there)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def configured_token() -> str | None:
    """The token of FERRY_SERVICE_TOKEN_FILE, or None when authentication is off (the variable unset or empty)."""
    path = os.environ.get(TOKEN_FILE_ENV, "")
    return read_token(path) if path else None


def use_token_file(path: str | os.PathLike) -> None:
    """Turn authentication on for this process and the processes it starts (sets the env var)."""
    read_token(path)                                    # fail now, with the file's name, not at the first call
    os.environ[TOKEN_FILE_ENV] = str(Path(path).resolve())


def is_authorized(metadata: Sequence[tuple[str, Any]] | None, token: str) -> bool:
    """True when the metadata carries `authorization: Bearer <token>` (constant-time comparison)."""
    expected = (SCHEME + token).encode()
    for key, value in metadata or ():
        if key.lower() == HEADER:
            given = value if isinstance(value, bytes) else str(value).encode()
            return hmac.compare_digest(given, expected)
    return False


def _deny_like(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind (unary/stream on each side) that aborts with UNAUTHENTICATED."""
    async def deny(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED_DETAILS)

    # No request deserializer: an unauthenticated peer's bytes are never parsed.
    serializers = {"request_deserializer": None, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny, **serializers)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **serializers)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny, **serializers)
    return grpc.unary_unary_rpc_method_handler(deny, **serializers)


class TokenServerInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through only with the bearer token (or to an open method)."""

    def __init__(self, token: str, open_prefixes: tuple[str, ...] = OPEN_METHOD_PREFIXES) -> None:
        self._token, self._open_prefixes = token, open_prefixes

    def __repr__(self) -> str:                          # keep the token out of any repr that gets logged
        return "TokenServerInterceptor(<token>)"

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(self._open_prefixes):
            return handler
        if is_authorized(handler_call_details.invocation_metadata, self._token):
            return handler
        return _deny_like(handler)


def _with_token(metadata: Any, token: str) -> list[tuple[str, Any]]:
    return [(k, v) for k, v in (metadata or ()) if k.lower() != HEADER] + [(HEADER, SCHEME + token)]


class _AioTokenInterceptor:
    """grpc.aio: adds the bearer token to the calls of one kind (grpc.aio files an interceptor under the
    first kind it implements only, so each kind is its own class: see client_interceptors())."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __repr__(self) -> str:                          # keep the token out of any repr that gets logged
        return f"{type(self).__name__}(<token>)"

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        return details._replace(metadata=grpc.aio.Metadata(*_with_token(details.metadata, self._token)))


class _UnaryUnary(_AioTokenInterceptor, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _UnaryStream(_AioTokenInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _StreamUnary(_AioTokenInterceptor, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


class _StreamStream(_AioTokenInterceptor, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


def client_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    """The interceptors of a grpc.aio channel that sends the token on every call."""
    return [kind(token) for kind in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]


class _SyncDetails(collections.namedtuple("_SyncDetails", ("method", "timeout", "metadata", "credentials",
                                                           "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
    pass


class SyncTokenClientInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                                 grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Blocking grpc channels (CLI tools, platform launchers): adds the bearer token to every call."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __repr__(self) -> str:
        return "SyncTokenClientInterceptor(<token>)"

    def _details(self, d: grpc.ClientCallDetails) -> _SyncDetails:
        return _SyncDetails(d.method, d.timeout, _with_token(d.metadata, self._token), d.credentials,
                            getattr(d, "wait_for_ready", None), getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)
