"""One Ray Serve replica: one `Engine` on one device.

Requests for an adapter carry its concrete version (`name@N`, or `name@N#i` for a hot version's
other homes: hot.py) as the multiplexed model id. The
multiplexed loader pins that version into the engine (so the engine's own slot LRU cannot evict
what Ray routes here), and Ray's per-replica LRU of model ids unpins the version it evicts.
Ray Serve's router sends each id to the replicas that report holding it, which is what keeps
one adapter's traffic on few replicas. Requests for the base carry no id.

No `@serve.batch`: the engine already batches across adapters, and `serve.batch` would split
its batches by model id.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

from loradock.registry.readonly import serving_registry
from loradock.runtime import Engine, EngineConfig
from loradock.runtime.http.bridge import EngineRequests
from loradock.runtime.stats import BASE_KEY
from loradock.runtime.types import EngineInfo, GenerationRequest, GenerationResult, TokenEvent
from ray import serve

from .hot import version_of
from .versions import Origin, VersionFetcher

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Finished:
    """The last item of a replica's stream: the result, which replica served it, and that
    replica's engine counters for the request's adapter version (for per-replica metrics)."""

    result: GenerationResult
    replica: str
    counters: dict[str, int]


class PinnedVersion:
    """What the multiplexed loader returns for one version; Ray calls `__del__` when its LRU
    evicts the id, which unpins the version (idempotent: Python may call it again at GC)."""

    def __init__(self, engine: Engine, ref: str) -> None:
        self._engine = engine
        self.ref = ref
        self._pinned = True

    def __del__(self) -> None:
        if not getattr(self, "_pinned", False):
            return
        self._pinned = False
        try:
            self._engine.unpin(self.ref)
        except Exception:  # the engine is stopping; nothing left to unpin
            log.debug("unpinning %s failed", self.ref, exc_info=True)


def replica_name() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a Serve replica (unit use)
        return f"pid{os.getpid()}"


class EngineReplica:
    """The replica deployment's class (options such as resources are set in `app.py`)."""

    def __init__(self, engine_config: EngineConfig, registry_root: str | None, slots: int,
                 hub_pull: bool = False) -> None:
        # A shared volume may be mounted read-only: digest records then go to a local cache dir.
        registry, note = serving_registry(registry_root)
        if note:
            log.info(note)
        self.engine = Engine(engine_config, registry).start()
        self.name = replica_name()
        self._fetcher = VersionFetcher(registry, hub_pull)
        self._origins: dict[str, Origin] = {}

        async def pin(model_id: str) -> PinnedVersion:
            ref = version_of(model_id)  # a hot version's other homes carry "#i" (hot.py)
            local = await asyncio.to_thread(self._fetcher.ensure, ref, self._origins.get(ref))
            await asyncio.to_thread(self.engine.load_adapter, local, True)
            return PinnedVersion(self.engine, local)

        self._pin = serve.multiplexed(max_num_models_per_replica=slots)(pin)
        log.info("replica %s ready (%d multiplexed versions)", self.name, slots)

    def info(self) -> EngineInfo:
        return self.engine.info()

    def check_health(self) -> None:
        """Ray Serve's health probe: a replica whose engine stopped is restarted."""
        if not self.engine.ready:
            raise RuntimeError("the engine is not running")

    async def generate(self, request: GenerationRequest, origin: Origin | None = None
                       ) -> AsyncIterator[TokenEvent | Finished]:
        """Token events as the engine produces them, then `Finished`. The request's adapter
        version is the multiplexed model id ("" for the base)."""
        model_id = serve.get_multiplexed_model_id()
        ref = version_of(model_id)
        if ref:
            if origin is not None:
                self._origins[ref] = origin
            pinned = await self._pin(model_id)
            if pinned.ref != request.adapter:  # pulled here under another number
                request = dataclasses.replace(request, adapter=pinned.ref)
        requests = EngineRequests(self.engine, [request])
        await requests.submit()
        try:
            async for _, item in requests.items():
                if isinstance(item, TokenEvent):
                    yield item
                else:
                    yield Finished(item, self.name, self.counters(ref))
        finally:
            requests.cancel()  # the client went away: free the sequence now

    async def warm(self, origin: Origin | None = None) -> str:
        """Load and pin the version of this call's multiplexed model id (an alias is about to
        point at it: the ingress's warm promotion) and say which replica holds it now."""
        model_id = serve.get_multiplexed_model_id()
        if origin is not None:
            self._origins[version_of(model_id)] = origin
        await self._pin(model_id)
        return self.name

    def counters(self, ref: str) -> dict[str, int]:
        key = self._fetcher.local_ref(ref) if ref else BASE_KEY
        return self.engine.counters(key)

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None and engine.ready:
            engine.shutdown(drain=False, timeout=5)
