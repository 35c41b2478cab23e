"""Requests that are no protobuf get INVALID_ARGUMENT, not UNKNOWN.

grpcio parses a request with the method's deserializer before the servicer sees it, and answers a
parse failure (`DecodeError`: truncated bytes, a reserved wire type, a length past the end) with
UNKNOWN "Unexpected <class DecodeError>", as if the servicer had crashed. `RequestGuard` wraps every
method's deserializer: a request that does not parse becomes a `Malformed` marker, and the call (or,
on a request stream, the next read) ends with INVALID_ARGUMENT naming the message type. Well-formed
requests pass through untouched; only the wrapper's few function calls are added.
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError


@dataclass(frozen=True, slots=True)
class Malformed:
    """What the guarded deserializer returns for bytes that do not parse."""
    reason: str


def _safe(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except DecodeError as e:
            return Malformed(f"the request is not a valid protobuf message: {e}")
    return parse


async def _refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
    if isinstance(request, Malformed):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)


async def _checked(requests: AsyncIterator, context: grpc.aio.ServicerContext) -> AsyncIterator:
    async for request in requests:
        await _refuse(request, context)
        yield request


async def _results(result: Any) -> AsyncIterator:
    """A response-streaming behavior's replies, whether it is an async generator or a coroutine."""
    if hasattr(result, "__aiter__"):
        async for reply in result:
            yield reply
    else:
        await result


def guard(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """The same method, with a deserializer that cannot raise and a refusal for what did not parse."""
    parse = _safe(handler.request_deserializer)
    serialize = handler.response_serializer
    if handler.unary_unary:
        inner_uu = handler.unary_unary

        async def unary_unary(request, context):
            await _refuse(request, context)
            return await inner_uu(request, context)
        return grpc.unary_unary_rpc_method_handler(unary_unary, parse, serialize)
    if handler.unary_stream:
        inner_us = handler.unary_stream

        async def unary_stream(request, context):
            await _refuse(request, context)
            async for reply in _results(inner_us(request, context)):
                yield reply
        return grpc.unary_stream_rpc_method_handler(unary_stream, parse, serialize)
    if handler.stream_unary:
        inner_su = handler.stream_unary

        async def stream_unary(requests, context):
            return await inner_su(_checked(requests, context), context)
        return grpc.stream_unary_rpc_method_handler(stream_unary, parse, serialize)
    inner_ss = handler.stream_stream

    async def stream_stream(requests, context):
        async for reply in _results(inner_ss(_checked(requests, context), context)):
            yield reply
    return grpc.stream_stream_rpc_method_handler(stream_stream, parse, serialize)


class RequestGuard(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return guard(handler)
