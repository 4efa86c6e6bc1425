"""The replica's pins: what Ray's multiplexed LRU evicts is unpinned in the engine, so the
engine's pin budget (max_slots - 1) frees up for the next version."""

from __future__ import annotations

from pathlib import Path

import pytest
from loradock.registry import BaseInfo, Registry
from loradock.runtime import AdapterUnavailableError, Engine, EngineConfig

from tests.adapters import make_lora_adapter
from tests.conftest import TINY_BASE

pytest.importorskip("ray")
from loradock.runtime.cluster.replica import PinnedVersion


def test_an_evicted_version_is_unpinned(registry: Registry, tiny_base: BaseInfo, tmp_path: Path):
    for i in range(3):
        registry.publish(make_lora_adapter(tiny_base.path, tmp_path / f"a{i}", rank=4, seed=i), f"a{i}",
                         base=TINY_BASE)
    engine = Engine(EngineConfig(base=TINY_BASE, quantize="none", device="cpu", max_slots=3, max_rank=8,
                                 max_model_len=128, max_prompt_tokens=64,
                                 kv_cache_tokens=512, cpu_threads=1), registry).start()
    try:
        engine.load_adapter("a0@1", pin=True)
        first = PinnedVersion(engine, "a0@1")
        engine.load_adapter("a1@1", pin=True)
        with pytest.raises(AdapterUnavailableError, match="at most max_slots - 1 = 2"):
            engine.load_adapter("a2@1", pin=True)
        first.__del__()  # what Ray's LRU calls on eviction
        first.__del__()  # and Python again at garbage collection: harmless
        engine.load_adapter("a2@1", pin=True)
        pinned = {r.adapter.ref for r in engine.resident_adapters() if r.pinned}
        assert pinned == {"a1@1", "a2@1"}
    finally:
        engine.shutdown(drain=False, timeout=5)


def test_two_homes_of_a_hot_version_on_one_replica_pin_it_until_both_are_evicted(
        registry: Registry, tiny_base: BaseInfo, tmp_path: Path):
    """`a0@1` and `a0@1#1` (hot.py) may both land on one replica: each pins the version, and it
    stays pinned until Ray's LRU has evicted both ids."""
    registry.publish(make_lora_adapter(tiny_base.path, tmp_path / "a0", rank=4, seed=0), "a0", base=TINY_BASE)
    engine = Engine(EngineConfig(base=TINY_BASE, quantize="none", device="cpu", max_slots=3, max_rank=8,
                                 max_model_len=128, max_prompt_tokens=64,
                                 kv_cache_tokens=512, cpu_threads=1), registry).start()
    try:
        homes = []
        for _ in range(2):
            engine.load_adapter("a0@1", pin=True)
            homes.append(PinnedVersion(engine, "a0@1"))

        def pinned() -> bool:
            return any(r.pinned for r in engine.resident_adapters() if r.adapter.ref == "a0@1")

        homes[0].__del__()
        assert pinned(), "the other home still holds it"
        homes[1].__del__()
        assert not pinned()
    finally:
        engine.shutdown(drain=False, timeout=5)
