"""Helpers for the hostile gRPC tests: calls with raw bytes or messages, and the status they end with."""
from __future__ import annotations

from collections.abc import Iterable

import grpc

from services.common.grpc_util import MAX_MESSAGE_BYTES

CALL_TIMEOUT_S = 10.0            # longer than this is a hang
# What a hostile message may get back: a clear refusal, never UNKNOWN/INTERNAL (an unhandled exception
# in the servicer) and never DEADLINE_EXCEEDED (a hang).
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.ALREADY_EXISTS}
# Bytes that are no protobuf: a truncated varint tag, wire type 7 (reserved), a length that runs past
# the end, a group start without its end.
MALFORMED = [b"\xff", b"\x0f", b"\x0a\xff\xff\xff\x0f", b"\x0a\x05ab", b"\x0b"]


def channel(address: str) -> grpc.Channel:
    """A client that sends more than the servers take (their limit is what is being tested)."""
    return grpc.insecure_channel(address, options=[("grpc.max_send_message_length", -1),
                                                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])


def call(address: str, path: str, kind: str, requests: Iterable, *, serialize=None,
         deserialize=None) -> tuple[grpc.StatusCode, str, list]:
    """(status, details, replies) of one call. `kind`: unary | client_stream | server_stream | bidi.
    Without `serialize`, requests are raw bytes."""
    requests = list(requests)
    with channel(address) as ch:
        make = {"unary": ch.unary_unary, "client_stream": ch.stream_unary, "server_stream": ch.unary_stream,
                "bidi": ch.stream_stream}[kind]
        method = make(path, request_serializer=serialize, response_deserializer=deserialize)
        arg = requests[0] if kind in ("unary", "server_stream") else iter(requests)
        try:
            result = method(arg, timeout=CALL_TIMEOUT_S)
            replies = list(result) if kind in ("server_stream", "bidi") else [result]
            return grpc.StatusCode.OK, "", replies
        except grpc.RpcError as e:
            return e.code(), e.details() or "", []


def message_call(address: str, path: str, kind: str, *messages) -> tuple[grpc.StatusCode, str, list]:
    """A call with protobuf messages (replies as raw bytes)."""
    return call(address, path, kind, messages, serialize=lambda m: m.SerializeToString())
