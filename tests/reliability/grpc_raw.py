"""Raw gRPC helpers for the reliability suite: call the Runtime service with messages the
typed client would refuse to build, or with hand-encoded bytes."""

from __future__ import annotations

import grpc
from loradock.proto.loradock.v1 import runtime_pb2 as pb
from loradock.proto.loradock.v1 import runtime_pb2_grpc as pb_grpc

GENERATE = "/loradock.v1.Runtime/Generate"
GENERATE_STREAM = "/loradock.v1.Runtime/GenerateStream"


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def length_delimited(field: int, payload: bytes) -> bytes:
    """One protobuf field of wire type 2 (string, bytes, message), encoded by hand."""
    return varint(field << 3 | 2) + varint(len(payload)) + payload


def call_raw(address: str, method: str, payload: bytes, timeout: float = 30.0) -> tuple[grpc.StatusCode, str]:
    """Send `payload` as the serialized request of `method`; return (code, details)."""
    with grpc.insecure_channel(address) as channel:
        identity = lambda b: b  # noqa: E731 (bytes go on the wire untouched)
        if method == GENERATE_STREAM:
            rpc = channel.unary_stream(method, request_serializer=identity,
                                       response_deserializer=pb.GenerateStreamResponse.FromString)
            call = lambda: list(rpc(payload, timeout=timeout))  # noqa: E731
        else:
            rpc = channel.unary_unary(method, request_serializer=identity,
                                      response_deserializer=pb.GenerateResponse.FromString)
            call = lambda: rpc(payload, timeout=timeout)  # noqa: E731
        try:
            call()
        except grpc.RpcError as e:
            return e.code(), e.details() or ""
        return grpc.StatusCode.OK, ""


def call_message(address: str, request: pb.GenerateRequest, stream: bool = False,
                 timeout: float = 60.0) -> tuple[grpc.StatusCode, str]:
    """Send a GenerateRequest as built (no client-side checks); return (code, details)."""
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.RuntimeStub(channel)
        try:
            if stream:
                list(stub.GenerateStream(request, timeout=timeout))
            else:
                stub.Generate(request, timeout=timeout)
        except grpc.RpcError as e:
            return e.code(), e.details() or ""
        return grpc.StatusCode.OK, ""
