"""`RequestHandle`: the caller's side of one submitted request."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

from .types import GenerationResult, TokenEvent

_DONE = object()


class RequestHandle:
    """Iterate for TokenEvents as they are produced; `result()` blocks for the GenerationResult.

    If the request fails, iteration and `result()` raise the engine error (for example
    AdapterUnavailableError) after any events already produced.
    """

    def __init__(self, request_id: str, on_cancel: Callable[[RequestHandle], None]) -> None:
        self.request_id = request_id
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._done = threading.Event()
        self._result: GenerationResult | None = None
        self._error: BaseException | None = None
        self._on_cancel = on_cancel
        self.cancel_requested = False

    # ---- engine side -----------------------------------------------------------------------

    def _emit(self, event: TokenEvent) -> None:
        self._events.put(event)

    def _finish(self, result: GenerationResult) -> None:
        self._result = result
        self._done.set()
        self._events.put(_DONE)

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._done.set()
        self._events.put(_DONE)

    # ---- caller side -----------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            item = self._events.get()
            if item is _DONE:
                if self._error is not None:
                    raise self._error
                return
            yield item

    def result(self, timeout: float | None = None) -> GenerationResult:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} not finished after {timeout} s")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def cancel(self) -> None:
        """Stop generating; the engine frees the sequence's KV cache and adapter pin on its next step."""
        if not self.done and not self.cancel_requested:
            self.cancel_requested = True
            self._on_cancel(self)
