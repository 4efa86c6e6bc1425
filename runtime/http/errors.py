"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, and which HTTP
status each engine or registry error becomes.

One table, read in order (first match wins, so subclasses come before their bases); anything
not in it is a bug in loradock and becomes 500. Every error also carries the status name the
metrics use for both edges (gRPC's canonical names), so `loradock_request_errors_total`
means the same whichever edge counted it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from loradock.registry import (
    DigestMismatchError,
    IncompatibleBaseError,
    InvalidAdapterError,
    InvalidNameError,
    NotFoundError,
)
from loradock.runtime.errors import (
    AdapterNotFoundError,
    AdapterUnavailableError,
    EngineShutdownError,
    InvalidRequestError,
    QueueFullError,
)

from .schemas import ErrorBody, ErrorResponse

log = logging.getLogger(__name__)

RETRY_AFTER_S = {429: 1, 503: 2}


@dataclass
class ApiError(Exception):
    """An error answer: HTTP status, OpenAI body fields, and the status name for the metrics."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    canonical: str = "INVALID_ARGUMENT"
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)
        if self.status in RETRY_AFTER_S:
            self.headers.setdefault("Retry-After", str(RETRY_AFTER_S[self.status]))

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorBody(message=self.message, type=self.type, param=self.param,
                                             code=self.code))

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status, headers=self.headers)


def bad_request(param: str, message: str, code: str = "invalid_value") -> ApiError:
    """400 naming the field; the message starts with the field too, as the engine's do."""
    return ApiError(400, message if message.startswith(param) else f"{param}: {message}", param=param,
                    code=code)


def unsupported(param: str, why: str) -> ApiError:
    return bad_request(param, f"{param}: not supported by loradock ({why})", code="unsupported_parameter")


def model_not_found(model: str, detail: str) -> ApiError:
    return ApiError(404, f"The model {model!r} does not exist: {detail}", param="model",
                    code="model_not_found", canonical="NOT_FOUND")


def loading() -> ApiError:
    return ApiError(503, "the base model is still loading; retry when GET /ready answers 200",
                    type="service_unavailable", code="loading", canonical="UNAVAILABLE")


def draining() -> ApiError:
    return ApiError(503, "the server is shutting down; retry on another replica",
                    type="service_unavailable", code="draining", canonical="UNAVAILABLE")


# Engine request fields as OpenAI names them; everything else keeps its own name.
ENGINE_FIELDS = {
    "sampling.max_new_tokens": "max_tokens",
    "sampling.temperature": "temperature",
    "sampling.top_p": "top_p",
    "sampling.top_k": "top_k",
    "sampling.seed": "seed",
    "sampling.stop": "stop",
    "sampling.logprobs": "logprobs",
    "sampling.repetition_penalty": "repetition_penalty",
    "sampling.frequency_penalty": "frequency_penalty",
    "sampling.presence_penalty": "presence_penalty",
    "sampling.logit_bias": "logit_bias",
    "sampling.min_tokens": "min_tokens",
    "sampling.stop_token_ids": "stop_token_ids",
    "sampling.structured": "structured_outputs",
    "prompt_token_ids": "prompt",
}


def _invalid_request(exc: InvalidRequestError, model: str, prompt_field: str) -> ApiError:
    text = str(exc)
    engine_field, sep, rest = text.partition(":")
    if engine_field == "adapter":  # the reference is not a valid name: no such model
        return model_not_found(model, rest.strip())
    if not sep or " " in engine_field:
        return bad_request(prompt_field, text)
    name = ENGINE_FIELDS.get(engine_field, engine_field)  # messages[0].role stays as it is
    if name == "prompt":
        name = prompt_field
    return bad_request(name, f"{name}:{rest}")


def error_for(exc: BaseException, *, model: str = "", prompt_field: str = "prompt",
              mixture: bool = False) -> ApiError:
    """The answer for an engine or registry error raised while serving `model` (or, with
    `mixture`, the request's mixture, whose components are what can be missing)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, (AdapterNotFoundError, NotFoundError, InvalidNameError)):
        if mixture:
            return ApiError(404, f"mixture.components: {exc}", param="mixture.components", code="model_not_found",
                            canonical="NOT_FOUND")
        return model_not_found(model, str(exc))
    if isinstance(exc, InvalidRequestError):
        return _invalid_request(exc, model, prompt_field)
    if isinstance(exc, (AdapterUnavailableError, DigestMismatchError, InvalidAdapterError,
                        IncompatibleBaseError)):
        return ApiError(400, f"The model {model!r} cannot be served: {exc}", param="model",
                        code="model_unavailable", canonical="FAILED_PRECONDITION")
    if isinstance(exc, QueueFullError):
        return ApiError(429, str(exc) or "the queue is full; retry later", type="rate_limit_error",
                        code="queue_full", canonical="RESOURCE_EXHAUSTED")
    if isinstance(exc, EngineShutdownError):
        return ApiError(503, str(exc), type="service_unavailable", code="shutting_down",
                        canonical="UNAVAILABLE")
    log.error("bug while serving a request", exc_info=exc)
    # Name the kind of bug without leaking internals; the traceback goes to the log.
    return ApiError(500, f"internal error ({type(exc).__name__}); see the server log", type="server_error",
                    code="internal_error", canonical="INTERNAL")


_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


def _union_member(part: str) -> bool:
    """pydantic's tag for a union member: a type ("str", "list[int]", "literal['a','b']",
    "constrained-str") or a model class ("NamedToolChoice"); field names are lower-case identifiers."""
    return part in _TYPE_NAMES or "[" in part or "-" in part or part[:1].isupper()


def _location(loc: tuple) -> str:
    """pydantic's ("body", "messages", 0, "content") as "messages[0].content"."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _union_member(part):
            continue  # the union member pydantic tried; the field is what the client wrote
        else:
            out += f".{part}" if out else str(part)
    return out


def validation_error(exc: RequestValidationError) -> ApiError:
    """400 naming every bad field (an unknown field is refused by name)."""
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid").get("ctx", {}).get("error", "")
        return ApiError(400, f"the request body is not valid JSON ({detail})", code="invalid_json")
    problems, first_param, first_code = [], None, "invalid_value"
    seen: set[str] = set()
    for e in errors:
        param = _location(tuple(e.get("loc", ())))
        kind = e.get("type", "")
        if kind == "extra_forbidden":
            text, code = "unknown field (neither OpenAI's nor one of the extensions in /openapi.json)", \
                "unknown_parameter"
        elif kind == "missing":
            text, code = "required", "missing_required_parameter"
        else:
            text, code = e.get("msg", "invalid"), "invalid_value"
        if param in seen:  # a union reports one error per member; the first says enough
            continue
        seen.add(param)
        problems.append(f"{param or 'body'}: {text}")
        if first_param is None:
            first_param, first_code = param or None, code
    return ApiError(400, "; ".join(problems), param=first_param, code=first_code)


def http_error(status: int, detail: str, headers: Mapping[str, str] | None = None) -> ApiError:
    """Starlette's own errors (no such route, wrong method, body too large) in OpenAI's shape,
    keeping their headers (a 405's `Allow`)."""
    kind = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(status, "http_error")
    canonical = {404: "NOT_FOUND", 405: "UNIMPLEMENTED", 413: "INVALID_ARGUMENT"}.get(status, "UNKNOWN")
    return ApiError(status, detail, type="invalid_request_error", code=kind, canonical=canonical,
                    headers=dict(headers or {}))
