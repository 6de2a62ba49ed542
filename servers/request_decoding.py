"""Requests whose bytes are not a valid protobuf message get INVALID_ARGUMENT, not an internal error.

gRPC parses a request before any handler runs; when parsing fails (a truncated or garbage message) grpcio
answers UNKNOWN with the Python exception's text, which reads like a server bug. This interceptor wraps the
Teacher service's deserializers so that a message that cannot be parsed reaches a handler that refuses it,
in one line, with the status that says the caller sent something wrong.
"""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError

from dskd.protos import teacher_pb2 as pb

SERVICE_PREFIX = f"/{pb.DESCRIPTOR.services_by_name['Teacher'].full_name}/"


class Undecodable:
    """Stands in for a request whose bytes did not parse."""

    def __init__(self, size: int, error: str) -> None:
        self.size, self.error = size, error

    def message(self, method: str) -> str:
        name = method.rsplit("/", 1)[-1]
        return (
            f"request: {self.size} bytes are not a valid {name} request ({self.error}); "
            f"send a message serialised from protos/teacher.proto"
        )


def _tolerant(deserializer):
    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except DecodeError as error:
            return Undecodable(len(data), " ".join(str(error).split()) or "corrupt wire format")

    return deserialize


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Answers INVALID_ARGUMENT to Teacher calls whose request does not parse (see the module doc)."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or handler.request_deserializer is None or not method.startswith(SERVICE_PREFIX):
            return handler
        deserializer = _tolerant(handler.request_deserializer)
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request, context):
                if isinstance(request, Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message(method))
                return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=deserializer, response_serializer=handler.response_serializer
            )
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def stream(request, context):
                if isinstance(request, Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message(method))
                async for reply in inner_stream(request, context):
                    yield reply

            return grpc.unary_stream_rpc_method_handler(
                stream, request_deserializer=deserializer, response_serializer=handler.response_serializer
            )
        return handler  # the Teacher service has no client-streaming methods
