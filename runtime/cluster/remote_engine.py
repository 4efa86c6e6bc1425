"""The engine as the ingress sees it: the replicas behind one Ray Serve handle.

`ClusterEngine` has the small part of `Engine`'s API the HTTP edge uses (`ready`, `info`,
`submit`, `load_adapter`, `unload_adapter`, `route`), so the edge's OpenAI routes run unchanged
on top of it. `route` promotes aliases warm, as one engine does: a moved alias takes traffic once
a replica has loaded its new version (`Replica.warm`). `submit` calls the replica handle with the request's concrete version as the
multiplexed model id, streaming; the `RemoteHandle` it returns iterates like the engine's own
handle and turns Ray's errors back into the engine's, so the edge answers with the same
statuses (a replica that died mid-request is a 503 the client retries).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import ray.exceptions
from loradock.registry import NotFoundError, Registry, RegistryError
from loradock.runtime.adapter_cache import LoadState
from loradock.runtime.errors import (
    AdapterUnavailableError,
    EngineError,
    EngineShutdownError,
    QueueFullError,
)
from loradock.runtime.promotion import AliasRoutes
from loradock.runtime.stats import BASE_KEY
from loradock.runtime.types import EngineInfo, GenerationRequest, GenerationResult, TokenEvent
from ray.serve import exceptions as serve_exceptions
from ray.serve.handle import DeploymentHandle

from .hot import HotVersions
from .replica import Finished
from .versions import Origin

log = logging.getLogger(__name__)

RETRY_HINT = "retry the request: another replica takes it"


def engine_error(error: BaseException) -> BaseException:
    """The engine or registry error a replica raised, or Ray's failure as an engine error."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, (EngineError, RegistryError)):
        return cause
    if isinstance(error, (EngineError, RegistryError)):
        return error
    if isinstance(error, serve_exceptions.BackPressureError):
        return QueueFullError(f"every replica's queue is full; {RETRY_HINT.split(':')[0]} later")
    if isinstance(error, (ray.exceptions.RayActorError, serve_exceptions.ReplicaUnavailableError,
                          serve_exceptions.DeploymentUnavailableError)):
        return EngineShutdownError(f"the replica serving this request stopped ({type(error).__name__}); {RETRY_HINT}")
    return error


class ReplicaBoard:
    """The latest engine counters each replica reported, per adapter version (thread-safe).
    Replicas report with every finished request; counters only grow, so the latest wins."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, dict[str, dict[str, int]]] = {}

    def record(self, replica: str, key: str, counters: dict[str, int]) -> None:
        with self._lock:
            self._counters.setdefault(replica, {})[key] = dict(counters)

    def snapshot(self) -> dict[str, dict[str, dict[str, int]]]:
        """{replica: {"name@N" or "<base>": {stat: value}}}"""
        with self._lock:
            return {r: {k: dict(c) for k, c in by_key.items()} for r, by_key in self._counters.items()}


class RemoteHandle:
    """One request on some replica, consumed like the engine's RequestHandle."""

    def __init__(self, request: GenerationRequest, stream, board: ReplicaBoard) -> None:
        self.request_id = request.request_id
        self._key = request.adapter or BASE_KEY
        self._stream = stream
        self._board = board
        self._result: GenerationResult | None = None
        self.replica: str | None = None

    @property
    def done(self) -> bool:
        return self._result is not None

    def __iter__(self) -> Iterator[TokenEvent]:
        try:
            for item in self._stream:
                if isinstance(item, Finished):
                    self.replica = item.replica
                    self._board.record(item.replica, self._key, item.counters)
                    self._result = item.result
                else:
                    yield item
        except Exception as e:
            raise engine_error(e) from None

    def result(self, timeout: float | None = None) -> GenerationResult:
        if self._result is None:
            for _ in self:
                pass
        if self._result is None:
            raise EngineShutdownError(f"the replica ended request {self.request_id} without a result; {RETRY_HINT}")
        return self._result

    def cancel(self) -> None:
        if self._result is None:
            self._stream.cancel()


class ClusterEngine:
    """The replicas, behind one handle, as one engine for the HTTP edge."""

    def __init__(self, replicas: DeploymentHandle, info: EngineInfo, registry: Registry,
                 hot: HotVersions | None = None, promotion_wait_s: float = 60.0) -> None:
        self._replicas = replicas
        self._info = info
        self._registry = registry
        self._origins: dict[str, Origin | None] = {}  # versions are immutable: cached for good
        self.hot = hot or HotVersions()
        self.board = ReplicaBoard()
        self._warming: dict[str, LoadState] = {}
        self._lock = threading.Lock()
        self.routes = AliasRoutes(registry, self._warm, self._warm_state, promotion_wait_s)
        self.ready = True

    def info(self) -> EngineInfo:
        return self._info

    def submit(self, request: GenerationRequest) -> RemoteHandle:
        """Send `request` (its adapter already a concrete `name@N`) to a replica holding that
        version (a hot version: to one of its homes, hot.py), or any replica when none does; the
        base goes to any replica."""
        ref = request.adapter or ""
        model_id = self.hot.model_id(ref, request.route_key or request.request_id) if ref else ""
        options = self._replicas.options(multiplexed_model_id=model_id, stream=True)
        stream = options.generate.remote(request, self._origin(ref) if ref else None)
        return RemoteHandle(request, stream, self.board)

    def route(self, ref: str, route_key: str | None = None) -> str:
        """An alias as the cluster serves it now (warm promotion, runtime/promotion.py: a moved
        alias takes traffic once a replica has loaded its new version)."""
        return self.routes.route(ref, route_key)

    def _warm(self, ref: str) -> None:
        """Have a replica load `ref` (the one Ray then sends its requests to), off the caller's thread."""
        with self._lock:
            self._warming[ref] = LoadState.LOADING

        def call() -> None:
            try:
                replica = self._replicas.options(multiplexed_model_id=ref).warm.remote(self._origin(ref)).result()
                state = LoadState.READY
                log.info("%s is loaded on replica %s", ref, replica)
            except Exception as e:
                state = LoadState.FAILED
                log.error("no replica could load %s: %s", ref, engine_error(e))
            with self._lock:
                self._warming[ref] = state

        threading.Thread(target=call, name=f"warm-{ref}", daemon=True).start()

    def _warm_state(self, ref: str) -> LoadState:
        with self._lock:
            return self._warming.get(ref, LoadState.ABSENT)

    def _origin(self, ref: str) -> Origin | None:
        if ref not in self._origins:
            try:
                self._origins[ref] = Origin.of(self._registry.resolve(ref, verify=False))
            except NotFoundError:
                return None  # the replica reports the missing version
        return self._origins[ref]

    def stats(self) -> dict:
        return {"replicas": self.board.snapshot()}

    def load_adapter(self, ref: str, pin: bool = False):
        raise AdapterUnavailableError(
            "loading adapters through the cluster's API is not supported: publish the version to "
            "the registry (every replica serves it on its first request)")

    def unload_adapter(self, ref: str) -> bool:
        raise AdapterUnavailableError(
            "unloading adapters through the cluster's API is not supported: each replica's LRU "
            "unloads what it no longer serves")
