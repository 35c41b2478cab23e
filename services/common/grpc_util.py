"""gRPC plumbing shared by every service: channel/server options sized for KV traffic, and helpers.

KV blocks travel in messages up to 4 MiB (plus framing), so both ends raise the default 4 MiB
message limit. The HTTP/2 settings are the ones measured to matter on loopback (ENVIRONMENT.md):
without BDP probing and with large frames and windows, grpc.aio streams ~2x faster.
"""
from __future__ import annotations

import grpc

MAX_MESSAGE_BYTES = 64 * 2**20

OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", 16 * 2**20),
    ("grpc.http2.max_frame_size", 16 * 2**20 - 1),
    ("grpc.so_reuseport", 0),
]


def aio_channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=OPTIONS)


def aio_server() -> grpc.aio.Server:
    return grpc.aio.server(options=OPTIONS)


def bind(server: grpc.aio.Server, host: str, port: int) -> int:
    """Bind host:port (port 0 = any free port); returns the bound port or raises with the address."""
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port} (in use?)")
    return bound
