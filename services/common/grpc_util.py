"""gRPC plumbing shared by every service: channel/server options sized for KV traffic, and helpers.

KV blocks travel in messages up to 4 MiB (plus framing), so both ends raise the default 4 MiB
message limit. The HTTP/2 settings are the ones measured to matter on loopback (ENVIRONMENT.md):
without BDP probing and with large frames and windows, grpc.aio streams ~2x faster.

Every channel and server of Ferry is made here, so service-to-service authentication is wired in one
place: a shared bearer token (services/common/service_auth.py, on when FERRY_SERVICE_TOKEN_FILE names
a file: servers check it, channels send it) and mutual TLS (services/common/service_tls.py, on when
FERRY_TLS_DIR names a folder: servers and channels both present certificates of one CA). Without the
variables nothing changes (plaintext, no interceptor at all).
"""
from __future__ import annotations

import grpc

from services.common import service_auth, service_tls
from services.common.grpc_guard import RequestGuard

MAX_MESSAGE_BYTES = 64 * 2**20

OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", 16 * 2**20),
    ("grpc.http2.max_frame_size", 16 * 2**20 - 1),
    ("grpc.so_reuseport", 0),
    # A service back after an outage is reached within ~2 s: gRPC's reconnect backoff otherwise grows
    # (x1.6 per failed attempt) to 2 minutes, and a client would fail fast long after the service returned.
    ("grpc.max_reconnect_backoff_ms", 2000),
]


def aio_channel(address: str) -> grpc.aio.Channel:
    token = service_auth.configured_token()
    interceptors = service_auth.client_interceptors(token) if token else None
    tls = service_tls.configured()
    if tls is None:
        return grpc.aio.insecure_channel(address, options=OPTIONS, interceptors=interceptors)
    return grpc.aio.secure_channel(address, service_tls.channel_credentials(tls),
                                   options=OPTIONS + service_tls.CHANNEL_OPTIONS, interceptors=interceptors)


def channel(address: str) -> grpc.Channel:
    """A blocking channel (CLI tools, platform launchers), with the service token and TLS when configured."""
    tls = service_tls.configured()
    plain = grpc.insecure_channel(address, options=OPTIONS) if tls is None else grpc.secure_channel(
        address, service_tls.channel_credentials(tls), options=OPTIONS + service_tls.CHANNEL_OPTIONS)
    token = service_auth.configured_token()
    return grpc.intercept_channel(plain, service_auth.SyncTokenClientInterceptor(token)) if token else plain


def aio_server() -> grpc.aio.Server:
    token = service_auth.configured_token()
    interceptors = [service_auth.TokenServerInterceptor(token)] if token else []
    # RequestGuard: a request that is no protobuf gets INVALID_ARGUMENT, not grpcio's UNKNOWN.
    return grpc.aio.server(options=OPTIONS, interceptors=[*interceptors, RequestGuard()])


def bind(server: grpc.aio.Server, host: str, port: int) -> int:
    """Bind host:port (port 0 = any free port); returns the bound port or raises with the address."""
    tls = service_tls.configured()
    address = f"{host}:{port}"
    bound = server.add_insecure_port(address) if tls is None else \
        server.add_secure_port(address, service_tls.server_credentials(tls))
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port} (in use?)")
    return bound
