"""Register the Runtime service with request parsing that cannot become INTERNAL.

The generated `add_RuntimeServicer_to_server` parses requests with `FromString`;
when a client sends bytes that are not a valid message (a string field holding
invalid UTF-8, say), gRPC answers "Exception deserializing request!" as INTERNAL
before any servicer code runs. Here parsing failures become a marker that the
handler turns into INVALID_ARGUMENT naming the message type.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError
from loradock.proto.loradock.v1 import runtime_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["Runtime"]


@dataclass(frozen=True)
class MalformedRequest:
    """Stands in for a request whose bytes did not parse."""

    message_type: str
    error: str


def _tolerant_parser(message_cls: type) -> Callable[[bytes], object]:
    def parse(data: bytes) -> object:
        try:
            return message_cls.FromString(data)
        except DecodeError as e:
            return MalformedRequest(message_cls.DESCRIPTOR.full_name, str(e))

    return parse


def _refuse(request: MalformedRequest, context: grpc.ServicerContext) -> None:
    context.abort(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"request is not a valid {request.message_type} message ({request.error}); "
        "string fields must be valid UTF-8",
    )


def _guard_unary(method: Callable) -> Callable:
    def handle(request, context):
        if isinstance(request, MalformedRequest):
            _refuse(request, context)
        return method(request, context)

    return handle


def _guard_stream(method: Callable) -> Callable:
    def handle(request, context):
        if isinstance(request, MalformedRequest):
            _refuse(request, context)
        yield from method(request, context)

    return handle


def add_runtime_servicer(servicer: object, server: grpc.Server) -> None:
    """Register every Runtime RPC of `servicer` on `server` (replaces the generated helper)."""
    handlers = {}
    for method in SERVICE.methods:
        parse = _tolerant_parser(getattr(pb, method.input_type.name))
        serialize = getattr(pb, method.output_type.name).SerializeToString
        behaviour = getattr(servicer, method.name)
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _guard_stream(behaviour), request_deserializer=parse, response_serializer=serialize
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _guard_unary(behaviour), request_deserializer=parse, response_serializer=serialize
            )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)
