"""Two cache tiers for adapters: device slots and host memory. Disk is the registry.

- Host tier: LoadedAdapter objects, LRU, bounded in bytes and in count. Filled by a
  small thread pool (`prefetch`) so reading and validating files overlaps decoding.
- Device tier: `num_slots` slots of the stacked LoRA buffers (slot 0 = no adapter is
  not counted). `acquire` pins an adapter into a slot for a running sequence; an
  unpinned slot is evicted (LRU) only once the incoming adapter is ready on the host,
  so a failed load never costs a resident adapter. Pinned slots are never evicted.
- Placement: adapters that target every layer take the lowest empty slot, the others (e.g.
  attention-only) the highest. A layer's batched LoRA op reads the slots from the first to
  the last that hold weights there, so layers only the former target (the MLP) read a
  compact low range rather than every other slot's zeros.
- Every slot change goes through `_write_slot`, which updates the table and writes (or
  clears) that slot in every LoRA layer the cache was given, so they cannot drift.
- Without `keep_host_copies` (on CPU, where the slots are host memory themselves) a host
  entry lives only until its adapter is in a slot; an adapter evicted from its slot is read
  again on its next use. Whenever a host entry goes, its pooled buffer goes back
  (`LoadedAdapter.release`) for the next load to write into.

`acquire`, `release`, `unload` run on the engine loop thread (they touch buffers
the forward reads); `prefetch` and `state` may be called from any thread.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import torch

from .adapter_weights import LoadedAdapter
from .stats import EngineStats
from .types import ResolvedAdapter

log = logging.getLogger(__name__)


class LoadState(enum.Enum):
    ABSENT = "absent"  # neither loading nor on the host: call prefetch
    LOADING = "loading"
    READY = "ready"  # on the host or already in a slot
    FAILED = "failed"


class SlotLayer(Protocol):
    """A layer holding one LoRA slot buffer per slot (`lora_layer.MultiLoRALinear`)."""

    def set_slot(self, slot: int, shrink: torch.Tensor | None, expand: torch.Tensor | None,
                 bias: torch.Tensor | None = None, dora_scale: torch.Tensor | None = None) -> None: ...


@dataclass(frozen=True)
class CacheCapacity:
    slots: int
    host_bytes: int
    host_count: int


class AdapterCache:
    def __init__(
        self,
        capacity: CacheCapacity,
        load: Callable[[ResolvedAdapter], LoadedAdapter],
        layers: Mapping[str, SlotLayer],
        stats: EngineStats,
        workers: int = 2,
        keep_host_copies: bool = True,
    ) -> None:
        self.capacity = capacity
        self.keep_host_copies = keep_host_copies
        self._load = load
        self._layers = layers
        self._stats = stats
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="loradock-load")
        self._lock = threading.RLock()
        self._host: OrderedDict[ResolvedAdapter, LoadedAdapter] = OrderedDict()  # LRU first
        self._host_bytes = 0
        self._loading: dict[ResolvedAdapter, Future] = {}
        self._failed: dict[ResolvedAdapter, BaseException] = {}
        self._slot_key: list[ResolvedAdapter | None] = [None] * (capacity.slots + 1)
        self._slot_of: dict[ResolvedAdapter, int] = {}
        self._slot_lru: OrderedDict[int, None] = OrderedDict()  # least recently used first
        self._pins: dict[ResolvedAdapter, int] = {}
        # pinned by load_adapter(pin=True): how many times (a replica pins a hot version once per home)
        self._sticky: dict[ResolvedAdapter, int] = {}

    # ---- host tier -------------------------------------------------------------------------

    def prefetch(self, key: ResolvedAdapter) -> Future | None:
        """Start reading `key` into host memory unless it is there, in a slot, or on its way."""
        with self._lock:
            if key in self._slot_of or key in self._host:
                return None
            if key in self._loading:
                return self._loading[key]
            self._failed.pop(key, None)
            future = self._pool.submit(self._load_to_host, key)
            self._loading[key] = future
            return future

    def _load_to_host(self, key: ResolvedAdapter) -> LoadedAdapter:
        try:
            loaded = self._load(key)
        except BaseException as e:
            with self._lock:
                self._loading.pop(key, None)
                self._failed[key] = e
            log.warning("loading adapter %s failed: %s", key.ref, e)
            raise
        with self._lock:
            self._loading.pop(key, None)
            self._put_host(key, loaded)
        self._stats.add(key.ref, loads=1)
        return loaded

    def _put_host(self, key: ResolvedAdapter, loaded: LoadedAdapter) -> None:
        self._host[key] = loaded
        self._host.move_to_end(key)
        self._host_bytes += loaded.nbytes
        # Host copies are only a cache (slots hold their own copy), so any entry may go,
        # except the one just added.
        while (self._host_bytes > self.capacity.host_bytes or len(self._host) > self.capacity.host_count) \
                and len(self._host) > 1:
            self._drop_host(next(iter(self._host)))

    def _drop_host(self, key: ResolvedAdapter) -> bool:
        """Forget `key`'s host copy and give its buffer back; False if there was none."""
        loaded = self._host.pop(key, None)
        if loaded is None:
            return False
        self._host_bytes -= loaded.nbytes
        loaded.release()
        return True

    def state(self, key: ResolvedAdapter) -> tuple[LoadState, BaseException | None]:
        with self._lock:
            if key in self._slot_of or key in self._host:
                return LoadState.READY, None
            if key in self._loading:
                return LoadState.LOADING, None
            if key in self._failed:
                return LoadState.FAILED, self._failed[key]
            return LoadState.ABSENT, None

    def forget_failure(self, key: ResolvedAdapter) -> None:
        with self._lock:
            self._failed.pop(key, None)

    def wait_ready(self, key: ResolvedAdapter, timeout: float | None = None) -> LoadedAdapter | None:
        """Block until `key` is loaded (re-raising its load error); None if it is only in a slot."""
        future = self.prefetch(key)
        if future is not None:
            return future.result(timeout=timeout)
        with self._lock:
            return self._host.get(key)

    # ---- device tier -----------------------------------------------------------------------

    def slot_of(self, key: ResolvedAdapter) -> int | None:
        with self._lock:
            return self._slot_of.get(key)

    def acquire(self, key: ResolvedAdapter) -> int | None:
        """Pin `key` into a device slot and return it; None while no slot can be freed or the
        adapter is not on the host yet (call `state`/`prefetch`)."""
        with self._lock:
            slot = self._slot_of.get(key)
            if slot is not None:
                self._stats.add(key.ref, cache_hits=1)
            else:
                loaded = self._host.get(key)
                if loaded is None:
                    return None
                slot = self._free_slot(from_top=not loaded.modules.keys() >= self._layers.keys())
                if slot is None:
                    return None
                self._write_slot(slot, key, loaded)
                self._stats.add(key.ref, slot_loads=1)
                if not self.keep_host_copies:
                    self._drop_host(key)
            self._pins[key] = self._pins.get(key, 0) + 1
            self._slot_lru.move_to_end(slot)
            if key in self._host:
                self._host.move_to_end(key)
            return slot

    def release(self, key: ResolvedAdapter) -> None:
        """Drop one pin taken by `acquire` (the sequence finished)."""
        with self._lock:
            n = self._pins.get(key, 0) - 1
            if n < 0:
                raise RuntimeError(f"adapter {key.ref} released more often than acquired")
            if n == 0:
                del self._pins[key]
            else:
                self._pins[key] = n

    def set_sticky(self, key: ResolvedAdapter, sticky: bool) -> None:
        """Keep `key` resident regardless of use (load_adapter(pin=True)) or undo one such pin."""
        with self._lock:
            count = self._sticky.get(key, 0) + (1 if sticky else -1)
            if count > 0:
                self._sticky[key] = count
            else:
                self._sticky.pop(key, None)

    def is_pinned(self, key: ResolvedAdapter) -> bool:
        with self._lock:
            return self._pins.get(key, 0) > 0 or key in self._sticky

    def _free_slot(self, from_top: bool) -> int | None:
        """An empty slot, the lowest or (`from_top`) the highest; else the least recently used
        unpinned one, emptied; None when every slot is pinned."""
        empty = range(len(self._slot_key) - 1, 0, -1) if from_top else range(1, len(self._slot_key))
        for slot in empty:
            if self._slot_key[slot] is None:
                return slot
        victim = next((slot for slot in self._slot_lru  # least recently used first
                       if not self.is_pinned(self._slot_key[slot])), None)
        if victim is not None:
            self._evict_slot(victim)
        return victim

    def _write_slot(self, slot: int, key: ResolvedAdapter | None, loaded: LoadedAdapter | None) -> None:
        """The one place the slot table and the device buffers change, together."""
        old = self._slot_key[slot]
        if old is not None:
            del self._slot_of[old]
            self._slot_lru.pop(slot, None)
        self._slot_key[slot] = None
        self._write_layers(slot, loaded)  # may raise: the slot then stays empty, never half-described
        if key is not None:
            self._slot_key[slot] = key
            self._slot_of[key] = slot
            self._slot_lru[slot] = None

    def _write_layers(self, slot: int, loaded: LoadedAdapter | None) -> None:
        """Copy an adapter into (or clear) `slot` of every layer; layers it does not target are
        cleared, so a slot never keeps a previous adapter's weights."""
        if loaded is not None and loaded.released:  # its buffer may hold another adapter by now
            raise RuntimeError(f"adapter {loaded.adapter.ref}: host copy used after its release")
        for name, layer in self._layers.items():
            m = loaded.modules.get(name) if loaded is not None else None
            if m is None:
                layer.set_slot(slot, None, None)
            else:  # host tensors are copied straight into the device buffers (no staging copy)
                layer.set_slot(slot, m.shrink, m.expand, bias=m.bias, dora_scale=m.dora_scale)

    def _evict_slot(self, slot: int) -> None:
        key = self._slot_key[slot]
        self._write_slot(slot, None, None)
        if key is not None:
            self._stats.add(key.ref, evictions=1)
            log.info("evicted adapter %s from slot %d", key.ref, slot)

    def unload(self, key: ResolvedAdapter) -> bool:
        """Remove `key` from its slot and the host tier; False if it was not resident.
        Raises RuntimeError while running sequences use it."""
        with self._lock:
            if self._pins.get(key, 0) > 0:
                raise RuntimeError(f"adapter {key.ref} is in use by running requests")
            self._sticky.pop(key, None)
            found = False
            slot = self._slot_of.get(key)
            if slot is not None:
                self._evict_slot(slot)
                found = True
            return self._drop_host(key) or found

    def resident(self) -> dict[str, list[dict]]:
        """{"device": [...], "host": [...]} describing what is loaded where."""
        with self._lock:
            device = [
                {"adapter": key, "slot": slot, "pins": self._pins.get(key, 0), "sticky": key in self._sticky}
                for slot, key in enumerate(self._slot_key) if key is not None
            ]
            host = [{"adapter": key, "bytes": loaded.nbytes} for key, loaded in self._host.items()]
            return {"device": device, "host": host}

    @property
    def host_bytes(self) -> int:
        return self._host_bytes

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
