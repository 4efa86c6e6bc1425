"""The adapter cache alone, with fake layers and a fake loader: slots, pins, LRU eviction,
host budget, and that the slot table and the layers' buffers change together."""

from __future__ import annotations

import threading

import pytest
import torch
from loradock.runtime.adapter_cache import AdapterCache, CacheCapacity, LoadState
from loradock.runtime.adapter_weights import LoadedAdapter, ModuleLoRA
from loradock.runtime.host_memory import HostBlocks
from loradock.runtime.stats import EngineStats
from loradock.runtime.types import ResolvedAdapter


class FakeLayer:
    """Records what each slot holds: the adapter's marker value, or None when cleared."""

    def __init__(self) -> None:
        self.slots: dict[int, float | None] = {}
        self.fail_next = False

    def set_slot(self, slot, shrink, expand, bias=None, dora_scale=None) -> None:
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("device write failed")
        self.slots[slot] = None if shrink is None else float(shrink[0, 0])


def key(i: int) -> ResolvedAdapter:
    return ResolvedAdapter(f"a{i}", 1, f"digest{i}")


def loaded(k: ResolvedAdapter, targets=("q", "v"), size: int = 4) -> LoadedAdapter:
    marker = float(k.name[1:])
    return LoadedAdapter(k, {t: ModuleLoRA(torch.full((1, size), marker), torch.zeros(1, 2), 1.0)
                             for t in targets})


def make_cache(slots: int = 2, host_bytes: int = 10**6, host_count: int = 100, load=None,
               keep_host_copies: bool = True):
    layers = {"q": FakeLayer(), "v": FakeLayer(), "o": FakeLayer()}
    cache = AdapterCache(CacheCapacity(slots, host_bytes, host_count), load or loaded, layers,
                         EngineStats(), workers=1, keep_host_copies=keep_host_copies)
    return cache, layers


def ready(cache: AdapterCache, k: ResolvedAdapter) -> None:
    cache.wait_ready(k)
    assert cache.state(k)[0] is LoadState.READY


def test_acquire_writes_every_layer_and_clears_untargeted_ones():
    cache, layers = make_cache()
    ready(cache, key(7))
    slot = cache.acquire(key(7))
    assert slot == 2 and cache.slot_of(key(7)) == 2, "not on every layer: the highest empty slot"
    assert layers["q"].slots[2] == 7 and layers["v"].slots[2] == 7
    assert layers["o"].slots[2] is None, "a layer the adapter does not target is cleared"


def test_adapters_on_every_layer_fill_from_the_bottom_the_others_from_the_top():
    """So that a layer only the former target ("o" here, the MLP in a model) holds weights in a
    compact low range of slots, which is all its batched op reads."""
    def load(k):
        return loaded(k, targets=("q", "v", "o") if k.name in ("a1", "a3") else ("q", "v"))

    cache, layers = make_cache(slots=4, load=load)
    for i in (1, 2, 3, 4):
        ready(cache, key(i))
    assert [cache.acquire(key(i)) for i in (1, 2, 3, 4)] == [1, 4, 2, 3]
    assert {s for s, marker in layers["o"].slots.items() if marker is not None} == {1, 2}


def test_lru_eviction_spares_pinned_slots_and_waits_when_all_are_pinned():
    cache, layers = make_cache(slots=2)
    for i in (1, 2, 3):
        ready(cache, key(i))
    assert cache.acquire(key(1)) == 2 and cache.acquire(key(2)) == 1  # from the top: q and v only
    assert cache.acquire(key(3)) is None, "both slots are pinned by running sequences"
    cache.release(key(2))
    cache.release(key(1))
    cache.acquire(key(1))  # a1 used again: a2 is now the least recently used
    cache.release(key(1))
    assert cache.acquire(key(3)) == 1, "the least recently used unpinned slot is evicted"
    assert cache.slot_of(key(2)) is None and layers["q"].slots[1] == 3


def test_sticky_adapters_are_never_evicted():
    cache, _ = make_cache(slots=1)
    ready(cache, key(1))
    ready(cache, key(2))
    cache.acquire(key(1))
    cache.release(key(1))
    cache.set_sticky(key(1), True)
    assert cache.acquire(key(2)) is None
    cache.set_sticky(key(1), False)
    assert cache.acquire(key(2)) == 1


def test_failed_slot_write_leaves_the_slot_empty_not_half_described():
    cache, layers = make_cache(slots=1)
    ready(cache, key(1))
    layers["v"].fail_next = True
    with pytest.raises(RuntimeError, match="device write failed"):
        cache.acquire(key(1))
    assert cache.slot_of(key(1)) is None, "the table must not claim a slot whose write failed"
    assert cache.acquire(key(1)) == 1 and layers["v"].slots[1] == 1


def test_host_tier_stays_within_its_byte_budget_and_failures_are_reported():
    per_adapter = loaded(key(1)).nbytes
    boom = threading.Event()

    def load(k):
        if k == key(9):
            boom.set()
            raise ValueError("corrupt adapter")
        return loaded(k)

    cache, _ = make_cache(host_bytes=2 * per_adapter, load=load)
    for i in (1, 2, 3):
        ready(cache, key(i))
    assert cache.host_bytes <= 2 * per_adapter
    assert cache.state(key(1))[0] is LoadState.ABSENT, "the oldest host copy made room"
    with pytest.raises(ValueError, match="corrupt adapter"):
        cache.wait_ready(key(9))
    state, error = cache.state(key(9))
    assert state is LoadState.FAILED and "corrupt" in str(error) and boom.is_set()


def test_release_more_than_acquired_is_a_bug_not_silence():
    cache, _ = make_cache()
    ready(cache, key(1))
    cache.acquire(key(1))
    cache.release(key(1))
    with pytest.raises(RuntimeError, match="released more often than acquired"):
        cache.release(key(1))


def test_without_host_copies_a_slot_write_gives_the_buffer_back():
    """On CPU the slots are host memory: once an adapter is in a slot its host copy goes and its
    pooled buffer returns for the next load; evicted from its slot, it is read again."""
    pool = HostBlocks()
    cache, layers = make_cache(slots=1, keep_host_copies=False,
                               load=lambda k: LoadedAdapter(k, loaded(k).modules, pool.take(64)))
    ready(cache, key(1))
    assert pool.free_bytes == 0 and cache.resident()["host"] != []
    assert cache.acquire(key(1)) == 1 and layers["q"].slots[1] == 1
    assert cache.resident()["host"] == [] and cache.host_bytes == 0 and pool.free_bytes == 64
    assert cache.state(key(1))[0] is LoadState.READY, "ready: in its slot"
    cache.release(key(1))
    ready(cache, key(2))
    assert cache.acquire(key(2)) == 1 and layers["q"].slots[1] == 2  # evicts a1
    assert cache.state(key(1))[0] is LoadState.ABSENT, "evicted from its slot, a1 is read again on use"


def test_a_released_host_copy_is_never_written_into_a_slot():
    """A buffer given back may hold another adapter by now: writing from it is a bug, caught."""
    pool = HostBlocks()
    stale = LoadedAdapter(key(3), loaded(key(3)).modules, pool.take(64))
    stale.release()
    cache, layers = make_cache(load=lambda k: stale)
    ready(cache, key(3))
    with pytest.raises(RuntimeError, match="after its release"):
        cache.acquire(key(3))
    assert cache.slot_of(key(3)) is None and 1 not in layers["q"].slots
