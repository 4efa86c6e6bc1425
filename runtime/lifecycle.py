"""One server process, one engine, any number of edges (gRPC, HTTP): the shared lifecycle.

`serve` starts every edge (bound, answering "still loading"), starts the engine (load,
quantize, warm up), marks the edges serving, waits for SIGTERM/SIGINT, then drains: every
edge refuses new requests and lets running ones finish (in parallel, up to the drain
timeout), then the engine shuts down. The edges know nothing of each other; this module
knows them only through the small `Edge` protocol.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Sequence
from typing import Protocol

from loradock.runtime.metrics import Metrics, start_metrics_http

log = logging.getLogger(__name__)

DEFAULT_DRAIN_TIMEOUT_S = 60.0


class EdgeState:
    """An edge's draining flag and its requests in flight (the HTTP gate and the gRPC drain gate
    count them; a drain waits for none to be left)."""

    def __init__(self) -> None:
        self._draining = threading.Event()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._idle = threading.Condition(self._lock)

    @property
    def draining(self) -> bool:
        return self._draining.is_set()

    def start_draining(self) -> None:
        self._draining.set()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def enter(self) -> None:
        with self._lock:
            self._in_flight += 1

    def leave(self) -> None:
        with self._lock:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """True when no API request is in flight within `timeout` s."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
            return True


class StartupError(RuntimeError):
    """The engine refused its configuration while starting (e.g. --device cuda without a GPU)."""


class Edge(Protocol):
    """What the lifecycle needs of an edge (the gRPC `RuntimeServer`, the HTTP `HttpServer`)."""

    def start(self) -> None:
        """Start answering (requests get "still loading" until `mark_serving`)."""

    def mark_serving(self) -> None:
        """The engine is warm: serve requests, report ready. Logs where it serves."""

    def drain(self, timeout: float) -> bool:
        """Refuse new requests, let running ones finish for up to `timeout` s, stop.
        True when every running request finished."""

    def stop(self) -> None:
        """Stop at once, cutting running requests off."""


def serve(
    engine,
    edges: Sequence[Edge],
    *,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT_S,
    metrics: Metrics | None = None,
    metrics_host: str = "127.0.0.1",
    metrics_port: int | None = None,
) -> int:
    """Run until SIGTERM/SIGINT, then drain every edge and shut the engine down.
    Returns the exit status (0 after a drain, clean or cut off at the timeout)."""
    if not edges:
        raise ValueError("nothing to serve: give at least one edge")
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    metrics_http = None
    started: list[Edge] = []
    try:
        for edge in edges:
            edge.start()
            started.append(edge)
        if metrics_port is not None:
            metrics_http = start_metrics_http(metrics or Metrics(), metrics_host, metrics_port)
            log.info("metrics on http://%s:%d/metrics", metrics_host, metrics_http.server_address[1])
        log.info("loading the base model and warming up ...")
        try:
            engine.start()
        except ValueError as e:  # the engine's word for a configuration this machine cannot serve
            raise StartupError(f"cannot start the engine: {e}") from e
        if not stop.is_set():
            for edge in edges:
                edge.mark_serving()
        stop.wait()
        log.info("draining: refusing new requests, waiting up to %.0f s for running ones", drain_timeout)
        drained = drain_all(edges, drain_timeout)
        engine.shutdown(drain=True, timeout=drain_timeout)
        log.info("stopped" if drained else "stopped; some requests were cut off after the drain timeout")
        return 0
    except BaseException:
        for edge in started:
            edge.stop()
        if engine.ready:
            engine.shutdown(drain=False)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if metrics_http is not None:
            metrics_http.shutdown()
            metrics_http.server_close()


def drain_all(edges: Sequence[Edge], timeout: float) -> bool:
    """Drain the edges in parallel (a slow stream on one does not eat the other's time)."""
    results: dict[int, bool] = {}

    def drain(i: int, edge: Edge) -> None:
        try:
            results[i] = edge.drain(timeout)
        except Exception:
            log.exception("draining %s failed", type(edge).__name__)
            results[i] = False

    threads = [threading.Thread(target=drain, args=(i, e), name=f"loradock-drain-{i}")
               for i, e in enumerate(edges)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return all(results.get(i, False) for i in range(len(edges)))
