"""Server interceptors guarding the Runtime service: bearer-token auth and the drain gate.

Only methods of `loradock.v1.Runtime` are guarded; health checks and reflection stay
open so load balancers and tools can probe a server without its token.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

import grpc
from loradock.runtime.lifecycle import EdgeState

SERVICE_PREFIX = "/loradock.v1.Runtime/"


def _rejecting_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, details: str):
    """A handler of the same shape as `handler` that fails every call with `code`."""

    def reject(request, context: grpc.ServicerContext):
        context.abort(code, details)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(reject)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(reject)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(reject)
    return grpc.unary_unary_rpc_method_handler(reject)


class _Guard(grpc.ServerInterceptor):
    """Rejects a Runtime call when `check(metadata)` returns (code, details)."""

    def __init__(self, check: Callable[[dict[str, str]], tuple[grpc.StatusCode, str] | None]) -> None:
        self._check = check

    def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        handler = continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(SERVICE_PREFIX):
            return handler
        metadata = {k: v for k, v in handler_call_details.invocation_metadata or () if isinstance(v, str)}
        failure = self._check(metadata)
        return handler if failure is None else _rejecting_handler(handler, *failure)


class BearerTokenAuth(_Guard):
    """Requires `authorization: Bearer <token>` metadata on every Runtime call."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the auth token is empty")
        self._expected = f"Bearer {token}".encode()
        super().__init__(self._verify)

    def _verify(self, metadata: dict[str, str]) -> tuple[grpc.StatusCode, str] | None:
        given = metadata.get("authorization")
        if given is None:
            return grpc.StatusCode.UNAUTHENTICATED, "missing 'authorization: Bearer <token>' metadata"
        if not hmac.compare_digest(given.encode(), self._expected):  # constant time
            return grpc.StatusCode.UNAUTHENTICATED, "wrong bearer token"
        return None


def _counted(handler: grpc.RpcMethodHandler, enter: Callable[[], None], leave: Callable[[], None]):
    """`handler` with `enter()` before each call and `leave()` once it has ended (a streamed
    answer: once its last message went out, or the stream was closed)."""
    if handler.response_streaming:
        behaviour = handler.stream_stream if handler.request_streaming else handler.unary_stream

        def call(request, context):
            enter()
            try:
                yield from behaviour(request, context)
            finally:
                leave()
    else:
        behaviour = handler.stream_unary if handler.request_streaming else handler.unary_unary

        def call(request, context):
            enter()
            try:
                return behaviour(request, context)
            finally:
                leave()
    make = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    return make[handler.request_streaming, handler.response_streaming](
        call, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)


class DrainGate(_Guard):
    """Once closed, new Runtime calls get UNAVAILABLE while calls already running finish; counts
    the running ones in an `EdgeState`, so a drain can keep the server up (answering
    UNAVAILABLE, not dropping connections) until they are done."""

    def __init__(self) -> None:
        self.state = EdgeState()
        super().__init__(self._verify)

    def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        handler = super().intercept_service(continuation, handler_call_details)
        if handler is None or not handler_call_details.method.startswith(SERVICE_PREFIX) or self.closed:
            return handler  # closed: the rejecting handler
        return _counted(handler, self.state.enter, self.state.leave)

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to `timeout` s for the running calls to end; True if they did."""
        return self.state.wait_idle(timeout)

    def close(self) -> None:
        self.state.start_draining()

    @property
    def closed(self) -> bool:
        return self.state.draining

    def _verify(self, metadata: dict[str, str]) -> tuple[grpc.StatusCode, str] | None:
        if self.closed:
            return grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another replica"
        return None
