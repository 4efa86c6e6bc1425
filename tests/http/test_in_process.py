"""The HTTP edge in-process over a small fake engine: what the edge itself decides (the concrete
version a `model` names, the usage of a streamed answer), checked without starting a server."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from loradock.registry import Registry
from loradock.runtime.handle import RequestHandle
from loradock.runtime.http.models import ModelCatalog, ServedModel
from loradock.runtime.http.routes import create_app
from loradock.runtime.metrics import Metrics
from loradock.runtime.types import (
    FinishReason,
    GenerationRequest,
    GenerationResult,
    ResolvedAdapter,
    Timings,
    TokenEvent,
)
from starlette.testclient import TestClient

from tests.conftest import TINY_BASE


class FakeEngine:
    """The part of `Engine` the HTTP edge calls. Each request is answered at once, choice i of
    an HTTP request (request id `PLAN-i`) with 2 + i tokens, so choices differ in length; every
    request is kept in `submitted` as the engine received it."""

    ready = True

    def __init__(self, fingerprint: str = "") -> None:
        self.submitted: list[GenerationRequest] = []
        self.fingerprint = fingerprint

    def info(self) -> SimpleNamespace:
        return SimpleNamespace(base_name=TINY_BASE, base_fingerprint=self.fingerprint, max_model_len=64,
                               max_prompt_tokens=48, max_rank=16, tool_call_parser="hermes")

    def submit(self, request: GenerationRequest) -> RequestHandle:
        self.submitted.append(request)
        handle = RequestHandle(request.request_id, on_cancel=lambda h: None)
        tokens = 2 + int(request.request_id.rpartition("-")[2])
        for i in range(tokens):
            handle._emit(TokenEvent(request.request_id, 100 + i, "x", i))
        adapter = None
        if request.adapter:
            name, _, version = request.adapter.partition("@")
            adapter = ResolvedAdapter(name, int(version) if version.isdigit() else 0, "0" * 64)
        handle._finish(GenerationResult(request.request_id, "x" * tokens, tuple(range(100, 100 + tokens)),
                                        FinishReason.LENGTH, adapter, prompt_tokens=5, completion_tokens=tokens,
                                        timings=Timings(1.0, 1.0, 2.0)))
        return handle


@pytest.fixture(scope="module")
def edge(http_registry: Registry) -> Iterator[tuple[TestClient, FakeEngine]]:
    engine = FakeEngine(http_registry.base(TINY_BASE).fingerprint)
    with TestClient(create_app(engine, http_registry, metrics=Metrics())) as client:
        yield client, engine


def chat_body(model: str, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, **extra}


def events(response) -> list[dict]:
    """The JSON of every SSE `data:` line, up to `[DONE]` (which must end the stream)."""
    data = re.findall(r"^data: ?(.*)$", response.text, re.MULTILINE)
    assert data[-1] == "[DONE]", response.text
    return [json.loads(d) for d in data[:-1]]


def test_the_catalog_resolves_aliases_and_latest_to_the_concrete_version(edge, http_registry):
    """Guards forwarding `model` unresolved: the engine (in a cluster, the replica router that
    pins versions) must be asked for `name@N`, never an alias or the bare name, which mean
    another version once the registry moves on. (The fixture's registry: mover@1, mover@2,
    prod -> 1.)"""
    catalog = ModelCatalog(FakeEngine(), http_registry)
    for model, concrete in [("mover@prod", "mover@1"), ("mover", "mover@2"), ("mover@1", "mover@1"),
                            (f"{TINY_BASE}:mover@prod", "mover@1"), (" mover@prod ", "mover@1")]:
        assert catalog.resolve(model) == ServedModel(concrete, concrete, "mover"), model
    assert catalog.resolve("") == catalog.resolve(TINY_BASE) == ServedModel(None, TINY_BASE, "")

    client, engine = edge
    before = len(engine.submitted)
    answer = client.post("/v1/chat/completions", json=chat_body("mover@prod"))
    assert answer.status_code == 200, answer.text
    assert [r.adapter for r in engine.submitted[before:]] == ["mover@1"]
    assert answer.json()["model"] == "mover@1"


def test_streamed_usage_counts_every_choice(edge):
    """Guards the usage chunk of a stream with n > 1 counting only one choice: it must equal the
    unary answer's usage (each choice's completion tokens, the prompt once)."""
    client, _ = edge
    unary = client.post("/v1/chat/completions", json=chat_body("", n=3)).json()
    assert len(unary["choices"]) == 3
    streamed = client.post("/v1/chat/completions",
                           json=chat_body("", n=3, stream=True, stream_options={"include_usage": True}))
    assert streamed.status_code == 200, streamed.text
    chunks = events(streamed)
    tokens = [c["choices"][0]["index"] for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert sorted(set(tokens)) == [0, 1, 2]
    assert len({tokens.count(i) for i in range(3)}) == 3, "choices of different lengths, so a miscount shows"
    assert chunks[-1]["choices"] == [] and all(c.get("usage") is None for c in chunks[:-1])
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] == len(tokens), "every streamed token of every choice is counted"
    assert usage == unary["usage"]


def test_a_model_card_is_found_by_every_name_generation_accepts(edge):
    client, _ = edge
    for model, root in [("mover@prod", "mover@1"), (f"{TINY_BASE}:mover@prod", "mover@1"), (f"{TINY_BASE}:", TINY_BASE),
                        (TINY_BASE, TINY_BASE)]:
        card = client.get(f"/v1/models/{model}")
        assert card.status_code == 200, (model, card.text)
        assert (card.json()["id"], card.json()["root"]) == (model, root)
    assert client.get("/v1/models/other-base:mover").status_code == 404


def test_a_wrong_method_is_405_with_allow(edge):
    client, _ = edge
    answer = client.get("/v1/chat/completions")
    assert answer.status_code == 405 and answer.json()["error"]["code"] == "method_not_allowed"
    assert answer.headers["Allow"] == "POST"
