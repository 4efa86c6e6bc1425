"""The OpenAPI document as the contract the server keeps.

FastAPI declares 422 for every body it validates; this edge answers 400 in OpenAI's error shape
instead, so 422 goes and 400 (and 413 for a body over the limit) is declared. Generation routes
also declare their `text/event-stream` answer (`stream: true`), the probes and `/version` are
open, the API routes declare 401 (a token is required when the server has one), and the
adapter routes 403 (runtime updates off). Token ids get the served vocabulary's bound as their
`maximum` (so the document is built once the engine is up; before, it is built again on the next
call). Checked by schemathesis in the suite (tests/http/test_contract.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from .schemas import TOKEN_ID_MARK

OPEN_PATHS = frozenset({"/health", "/ready", "/version", "/metrics", "/openapi.json"})
STREAMING_PATHS = {"/v1/chat/completions": "ChatCompletionChunk", "/v1/completions": "Completion"}
ADAPTER_UPDATE_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})
_ERROR = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}


def _error(description: str) -> dict:
    return {"description": description, **_ERROR}


def _bound_token_ids(node: Any, vocab_size: int | None) -> None:
    """Replace each token-id mark in the schema tree by `maximum: vocab_size - 1`."""
    if isinstance(node, dict):
        if node.pop(TOKEN_ID_MARK, False) and vocab_size:
            node["maximum"] = vocab_size - 1
        for value in node.values():
            _bound_token_ids(value, vocab_size)
    elif isinstance(node, list):
        for value in node:
            _bound_token_ids(value, vocab_size)


def contract(app: FastAPI, extra_schemas: dict[str, Any], vocab_size: Callable[[], int | None]) -> None:
    """Make `app.openapi()` return the document described above; `extra_schemas` are component
    schemas no route returns directly (the streamed chunk); `vocab_size()` is None until the
    engine is up."""

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        components = doc.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        components.update(extra_schemas)
        for path, operations in doc["paths"].items():
            for operation in operations.values():
                responses = operation["responses"]
                responses.pop("422", None)
                if "requestBody" in operation:
                    responses["400"] = _error("a field is missing, unknown or invalid (it is named in `param`)")
                    responses["413"] = _error("the body is over the server's limit")
                if path not in OPEN_PATHS:
                    responses["401"] = _error("the bearer token is missing or wrong")
                if path in ADAPTER_UPDATE_PATHS:
                    responses["403"] = _error("runtime adapter updates are off (--allow-adapter-updates)")
                if path in STREAMING_PATHS:
                    responses["200"]["content"]["text/event-stream"] = {"schema": {  # one event
                        "type": "object", "required": ["data"],
                        "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
                        "description": f"with stream: true, server-sent events: `data: <{STREAMING_PATHS[path]} "
                                       "as JSON>` per chunk, `data: {\"error\": ...}` if it fails after the "
                                       "start, then `data: [DONE]`"}}
        vocab = vocab_size()
        _bound_token_ids(doc, vocab)
        if vocab:  # complete: keep it
            app.openapi_schema = doc
        return doc

    app.openapi = openapi
