"""Serving one chat or text completion: resolve the model, plan, submit, then answer unary
(one JSON body) or streaming (server-sent events ending with `data: [DONE]`).

A streamed answer starts only when its first token (or its error) is there, so a request
that fails to start (unknown model, queue full, an adapter that cannot load) gets its real
status code, not a 200 with an error inside. A client that disconnects cancels its engine
requests at once, whether it was still waiting or already streaming.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Sequence

from fastapi import Request, Response
from fastapi.sse import EventSourceResponse, format_sse_event
from loradock.runtime.metrics import UNRESOLVED, Metrics
from loradock.runtime.types import GenerationResult, TokenEvent
from starlette.types import Receive, Scope, Send

from . import convert
from .bridge import ClientGone, EngineRequests, Item, unless_disconnected
from .errors import ApiError, error_for
from .models import ModelCatalog, ServedModel

DONE = format_sse_event(data_str="[DONE]")
CLIENT_CLOSED = 499  # nginx's status for "the client went away"; nobody reads it

PlanBuilder = Callable[[ServedModel], convert.Plan]


class Outcome:
    """The metrics of one generation request, recorded once however it ends."""

    def __init__(self, metrics: Metrics, method: str) -> None:
        self._metrics = metrics
        self.method = method
        self.label = UNRESOLVED  # until the model resolves
        self._recorded = False

    def record(self, code: str, results: Sequence[GenerationResult] = ()) -> None:
        if self._recorded:
            return
        self._recorded = True
        if results:
            first = results[0]
            self.label = first.adapter.name if first.adapter else ""
        self._metrics.observe(self.label, self.method, code, results[0] if results else None)
        for r in results[1:]:
            self._metrics.add_tokens(self.label, r.prompt_tokens, r.completion_tokens)

    def failed(self, error: ApiError) -> Response:
        self.record(error.canonical)
        return error.response()


class EngineEventStream(EventSourceResponse):
    """Server-sent events that run `on_close` the moment the response ends, however it ends
    (finished, or cancelled by Starlette because the client disconnected)."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


class Generation:
    """Runs chat and text completions against one engine."""

    def __init__(self, engine, catalog: ModelCatalog, metrics: Metrics) -> None:
        self._engine = engine
        self._catalog = catalog
        self._metrics = metrics
        self._token_texts: convert.TokenTexts | None = None

    def _texts(self) -> convert.TokenTexts:
        """Token texts for log probabilities (the tokenizer is there once the engine has started)."""
        if self._token_texts is None:
            self._token_texts = convert.TokenTexts(getattr(self._engine, "tokenizer", None))
        return self._token_texts

    async def run(self, request: Request, model: str, build: PlanBuilder, *, chat: bool, stream: bool,
                  route_key: str | None = None) -> Response:
        created = int(time.time())
        outcome = Outcome(self._metrics, ("ChatCompletions" if chat else "Completions") + ("Stream" if stream else ""))
        prompt_field = "messages" if chat else "prompt"
        plan = None
        try:
            served = await asyncio.to_thread(self._catalog.resolve, model, route_key)
            outcome.label = served.label
            plan = build(served)
            if route_key:  # the engine routes nothing more (the version is concrete); a cluster keeps a caller on one home
                plan = dataclasses.replace(plan, requests=[dataclasses.replace(r, route_key=route_key)
                                                           for r in plan.requests])
            requests = EngineRequests(self._engine, plan.requests)
            await requests.submit()
        except Exception as e:
            mixed = plan is not None and any(r.mixture is not None for r in plan.requests)
            return outcome.failed(error_for(e, model=model, prompt_field=prompt_field, mixture=mixed))
        try:
            if not plan.stream:
                results = await unless_disconnected(request, requests.finish())
                outcome.record("OK", results)
                body = (convert.chat_completion if chat else convert.completion)(plan, results, created,
                                                                                  self._texts())
                return Response(body.model_dump_json(), media_type="application/json")
            items = requests.items()
            first = await unless_disconnected(request, anext(items))
        except ClientGone:
            requests.cancel()
            outcome.record("CANCELLED")
            return Response(status_code=CLIENT_CLOSED)
        except Exception as e:
            requests.cancel()
            return outcome.failed(error_for(e, model=model, prompt_field=prompt_field))

        def closed() -> None:
            requests.cancel()  # a finished request is not affected
            outcome.record("CANCELLED")  # no-op when the stream already recorded its end

        writer = convert.ChunkWriter(plan, created, chat, self._texts(), self._engine.info().tool_call_parser)
        events = self._events(writer, requests, first, items, outcome, model, prompt_field)
        return EngineEventStream(events, on_close=closed)

    @staticmethod
    async def _events(writer: convert.ChunkWriter, requests: EngineRequests, first: Item,
                      items: AsyncIterator[Item], outcome: Outcome, model: str,
                      prompt_field: str) -> AsyncIterator[bytes]:
        opened: set[int] = set()

        def chunks(index: int, item: TokenEvent | GenerationResult) -> list[str]:
            out = []
            if index not in opened:
                opened.add(index)
                opening = writer.opening(index)
                if opening is not None:
                    out.append(opening)
            if isinstance(item, TokenEvent):
                chunk = writer.token(index, item)
                out += [chunk] if chunk is not None else []
            else:
                out += writer.finished(index, item)
            return out

        try:
            for chunk in chunks(*first):
                yield format_sse_event(data_str=chunk)
            async for index, item in items:
                for chunk in chunks(index, item):
                    yield format_sse_event(data_str=chunk)
            results = [r for r in requests.results if r is not None]
            if writer.plan.include_usage:
                yield format_sse_event(data_str=writer.usage(results))
            outcome.record("OK", results)
        except Exception as e:  # the engine failed after the stream started: say so in the stream
            error = error_for(e, model=model, prompt_field=prompt_field)
            outcome.record(error.canonical)
            yield format_sse_event(data_str=convert.error_event(error))
        yield DONE
