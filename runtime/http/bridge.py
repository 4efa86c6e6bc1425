"""The engine's blocking request handles as one asyncio stream, and the client's disconnect.

`EngineRequests` submits a plan's requests (one per choice) and gives their output as one
async iterator of `(choice, TokenEvent | GenerationResult)`. Each handle is drained by a
small thread that hands items to the event loop (`call_soon_threadsafe`), so the loop never
blocks on the engine. `cancel()` cancels every handle: the engine frees their KV cache and
adapter pins on its next step.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import TypeVar

from loradock.runtime.types import GenerationRequest, GenerationResult, TokenEvent
from starlette.requests import Request

T = TypeVar("T")
Item = tuple[int, TokenEvent | GenerationResult]


class ClientGone(Exception):
    """The HTTP client disconnected before the answer was ready."""


class EngineRequests:
    """The engine requests of one HTTP request, consumed from the event loop."""

    def __init__(self, engine, requests: Sequence[GenerationRequest]) -> None:
        self._engine = engine
        self._requests = list(requests)
        self._handles: list = []
        self._queue: asyncio.Queue[tuple[int, object]] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self.results: list[GenerationResult | None] = [None] * len(self._requests)

    async def submit(self) -> None:
        """Submit every request (in a worker thread: chat templates and tokenizing take a
        while); on any refusal cancel those already queued and raise the engine's error."""
        await asyncio.to_thread(self._submit_all)
        for i, handle in enumerate(self._handles):
            threading.Thread(target=self._pump, args=(i, handle), name="loradock-http-pump",
                             daemon=True).start()

    def _submit_all(self) -> None:
        try:
            for request in self._requests:
                self._handles.append(self._engine.submit(request))
        except BaseException:
            self.cancel()
            raise

    def _pump(self, index: int, handle) -> None:
        def put(item: object) -> bool:
            try:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, (index, item))
                return True
            except RuntimeError:  # the event loop is gone (server stopped): nobody is listening
                handle.cancel()
                return False

        try:
            for event in handle:
                if not put(event):
                    return
            put(handle.result())
        except BaseException as e:  # the engine's error for this request, raised to the reader
            put(e)

    def cancel(self) -> None:
        """Cancel every request (those that finished are not affected)."""
        for handle in self._handles:
            handle.cancel()

    async def items(self) -> AsyncIterator[Item]:
        """Token events and final results, as produced, until every choice finished. A failed
        request raises its engine error (after cancelling the other choices)."""
        pending = len(self._requests)
        while pending:
            index, item = await self._queue.get()
            if isinstance(item, BaseException):
                self.cancel()
                raise item
            if isinstance(item, GenerationResult):
                self.results[index] = item
                pending -= 1
            yield index, item  # type: ignore[misc]

    async def finish(self) -> list[GenerationResult]:
        """Wait for every final result (unary requests)."""
        async for _ in self.items():
            pass
        return [r for r in self.results if r is not None]


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, awaitable: Awaitable[T]) -> T:
    """Await `awaitable`, or raise ClientGone as soon as the client disconnects (the caller
    cancels the engine requests). The request body must have been read already."""
    work = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            return work.result()
        raise ClientGone
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
