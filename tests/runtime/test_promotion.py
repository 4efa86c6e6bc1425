"""Warm promotion (runtime/promotion.py): an alias in use moves only once its new version is
loaded, so no request pays the cold load; a version that cannot load is never switched to."""

from __future__ import annotations

import logging
import statistics
import time

import pytest
from loradock.runtime import GenerationRequest, SamplingParams
from loradock.runtime.adapter_source import AdapterSource
from loradock.runtime.http.models import ModelCatalog
from loradock.runtime.metrics import Metrics

SLOW_LOAD_S = 1.5


def req(adapter: str, key: str = "") -> GenerationRequest:
    return GenerationRequest(adapter=adapter, prompt="Tell me a story", route_key=key,
                             sampling=SamplingParams(max_new_tokens=4, ignore_eos=True))


@pytest.fixture
def promo(tiny_registry, tiny_base, tiny_adapter_dirs, monkeypatch):
    """promo@1 (alias prod) and promo@2, whose read from the registry (and promo@3's, once
    published) takes SLOW_LOAD_S more (a large adapter on a slow disk), so a request that waited
    for it would show it."""
    reg = tiny_registry
    reg.publish(tiny_adapter_dirs["law"], "promo", base=tiny_base.name, aliases=["prod"])
    reg.publish(tiny_adapter_dirs["chem"], "promo", base=tiny_base.name)
    read = AdapterSource.read

    def slow_read(self, key):
        if key.ref in ("promo@2", "promo@3"):
            time.sleep(SLOW_LOAD_S)
        return read(self, key)

    monkeypatch.setattr(AdapterSource, "read", slow_read)
    return reg


def serve_until(engine, version: int, key: str = "", timeout: float = 30) -> list[tuple[int, float]]:
    """(version, TTFT ms) of promo@prod requests, one after another, until `version` serves one."""
    served: list[tuple[int, float]] = []
    deadline = time.monotonic() + timeout
    while (not served or served[-1][0] != version) and time.monotonic() < deadline:
        result = engine.generate(req("promo@prod", key), timeout=60)
        served.append((result.adapter.version, result.timings.ttft_ms))
    return served


def test_a_promotion_loads_the_new_version_before_it_takes_traffic(promo, tiny_base, engine_factory, capsys):
    engine = engine_factory(promo, tiny_base.name, run_loop=True)
    warm = [engine.generate(req("promo@prod"), timeout=60).timings.ttft_ms for _ in range(5)]  # promo@1 loaded
    moved = time.monotonic()
    promo.tag("promo@2", "prod", reason="better answers")
    served = [(engine.generate(req("promo@prod"), timeout=60).adapter.version, 0.0)]
    page = Metrics(engine.stats).render().decode()
    assert 'loradock_engine_alias_promoting{alias="promo@prod"} 1.0' in page
    served += serve_until(engine, 2)
    took = time.monotonic() - moved
    versions = [v for v, _ in served]
    assert versions[-1] == 2 and set(versions[:-1]) == {1}, versions  # never an error, never back
    assert took >= SLOW_LOAD_S, "promo@2 took traffic before it could have been loaded"
    assert max(ttft for _, ttft in served) < SLOW_LOAD_S * 1000 / 2, served  # nobody waited for the load
    page = Metrics(engine.stats).render().decode()
    assert 'loradock_engine_adapter_resident{adapter="promo",tier="device",version="2"} 1.0' in page
    promo.publish(promo.resolve("promo@1").path, "promo")  # promo@3: never served here
    catalog = ModelCatalog(engine, promo)  # /v1/models
    assert [catalog.card(m).residency for m in ("promo@prod", "promo@2", "promo@3")] == ["device", "device", "disk"]
    assert "loradock_engine_alias_promoting{" not in page
    # a canary start is promoted alike: promo@3 (slow too) takes none of its share until loaded
    started = time.monotonic()
    promo.tag("promo@3", "prod", weight=50)
    canary = []
    for i in range(400):  # route keys spread over both versions once the canary runs
        result = engine.generate(req("promo@prod", key=f"user-{i}"), timeout=60)
        canary.append((result.adapter.version, result.timings.ttft_ms))
        if result.adapter.version == 3:
            break
    assert canary[-1][0] == 3 and time.monotonic() - started >= SLOW_LOAD_S, canary
    assert max(ttft for _, ttft in canary) < SLOW_LOAD_S * 1000 / 2, canary
    with capsys.disabled():
        print(f"\nwarm promotion: {len(served) - 1} requests on promo@1 while promo@2 loaded ({took:.2f} s); "
              f"first promo@2 TTFT {served[-1][1]:.1f} ms, warm promo@1 median {statistics.median(warm):.1f} ms")


def test_a_rollback_takes_effect_at_once_even_cold(promo, tiny_base, engine_factory):
    """An emergency does not wait: the first request after a rollback is on the old target."""
    promo.tag("promo@2", "prod")
    engine = engine_factory(promo, tiny_base.name, run_loop=True)
    assert engine.generate(req("promo@prod"), timeout=60).adapter.version == 2
    promo.rollback("promo", "prod", reason="regression")
    assert engine.generate(req("promo@prod"), timeout=60).adapter.version == 1


def test_a_version_that_cannot_load_is_never_switched_to(promo, tiny_base, tiny_adapter_dirs, engine_factory,
                                                         caplog):
    """promo@2's file is damaged after publishing: the alias stays on promo@1 (logged), no
    request fails; moving the alias again to a good version works as usual."""
    engine = engine_factory(promo, tiny_base.name, run_loop=True)
    engine.generate(req("promo@prod"), timeout=60)
    weights = promo.resolve("promo@2", verify=False).path / "adapter_model.safetensors"
    weights.chmod(0o644)
    with open(weights, "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\0" * 8)
    with caplog.at_level(logging.ERROR, logger="loradock.runtime.promotion"):
        promo.tag("promo@2", "prod")
        versions = [engine.generate(req("promo@prod"), timeout=60).adapter.version for _ in range(30)]
        time.sleep(SLOW_LOAD_S + 0.5)  # the load has failed by now
        versions += [engine.generate(req("promo@prod"), timeout=60).adapter.version for _ in range(5)]
    assert set(versions) == {1}
    assert any("promo@prod stays on promo@1: promo@2 failed to load" in r.message for r in caplog.records)
    promo.publish(tiny_adapter_dirs["bio"], "promo", aliases=["prod"])  # promo@3, loads at normal speed
    assert serve_until(engine, 3)[-1][0] == 3
