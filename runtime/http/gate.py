"""The HTTP edge's gate, one ASGI middleware in front of every route (as the gRPC edge's
interceptors are): while draining, API requests get 503; without the bearer token, 401; while
the base loads, 503; a body over the size limit, 413. The console's session cookie
(session.py) counts as the token, so its playground calls the API as the browser's user.
Health, readiness and metrics stay open, as gRPC health and reflection do. It also counts
requests in flight (the drain waits for them) and every HTTP request in the metrics, by route
template, so unknown paths cannot create new series.
"""

from __future__ import annotations

import time

from loradock.runtime.lifecycle import EdgeState
from loradock.runtime.metrics import Metrics
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ApiError, draining, loading
from .session import has_session, presents_token

API_PREFIX = "/v1/"
API_ROOT_PATHS = frozenset({"/tokenize", "/detokenize"})  # vLLM's, outside /v1/ but the API all the same
UNMATCHED = "(unmatched)"


class _TooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, too_large(limit).message)


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than {limit} bytes (--max-message-bytes)",
                    code="body_too_large")


class Gate:
    """Pure ASGI middleware (streams pass through untouched)."""

    def __init__(self, app: ASGIApp, *, engine, state: EdgeState, metrics: Metrics,
                 auth_token: str | None = None, max_body_bytes: int | None = None) -> None:
        self.app = app
        self._engine = engine
        self._state = state
        self._metrics = metrics
        self._token = auth_token
        self._max_body = max_body_bytes

    def _refusal(self, scope: Scope) -> ApiError | None:
        if self._state.draining:
            return draining()
        if self._token is not None:
            headers = dict(scope.get("headers") or ())
            given, cookie = headers.get(b"authorization"), headers.get(b"cookie")
            if given is None and not has_session(cookie, self._token):
                return ApiError(401, "missing 'Authorization: Bearer <token>' header", type="authentication_error",
                                code="invalid_api_key", canonical="UNAUTHENTICATED")
            if not presents_token(given, cookie, self._token):
                return ApiError(401, "wrong bearer token", type="authentication_error",
                                code="invalid_api_key", canonical="UNAUTHENTICATED")
        if not self._engine.ready:
            return loading()
        length = dict(scope.get("headers") or ()).get(b"content-length", b"")
        if self._max_body is not None and length.isdigit() and int(length) > self._max_body:
            return too_large(self._max_body)
        return None

    def _limited(self, receive: Receive) -> Receive:
        """`receive` that stops a chunked body (no Content-Length) at the size limit."""
        if self._max_body is None:
            return receive
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self._max_body:  # type: ignore[operator]
                raise _TooLarge(self._max_body)  # type: ignore[arg-type]
            return message

        return limited

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # unless a response starts
        api = scope["path"].startswith(API_PREFIX) or scope["path"] in API_ROOT_PATHS

        started = False

        async def send_status(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        if api:
            self._state.enter()
        try:
            refusal = self._refusal(scope) if api else None
            if refusal is not None:
                await refusal.response()(scope, receive, send_status)
            else:
                await self.app(scope, self._limited(receive), send_status)
        except _TooLarge:
            if started:
                raise
            await too_large(self._max_body or 0).response()(scope, receive, send_status)
        finally:
            if api:
                self._state.leave()
            self._metrics.observe_http(route_of(scope), scope["method"], status, time.perf_counter() - start)


def route_of(scope: Scope) -> str:
    """The route template that served the request (a refused request never reached the router:
    its path when it is one of ours), else one shared label."""
    route = getattr(scope.get("route"), "path", None)
    if route:
        return route
    return scope["path"] if scope["path"] in KNOWN_PATHS else UNMATCHED


KNOWN_PATHS = frozenset({"/v1/models", "/v1/chat/completions", "/v1/completions",
                         "/v1/load_lora_adapter", "/v1/unload_lora_adapter", *API_ROOT_PATHS})
