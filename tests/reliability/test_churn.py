"""Adapter churn in an in-process engine: a thousand load/evict cycles through two device
slots and a two-adapter host cache leave memory flat and every adapter still matching the
PEFT oracle; a same-name republish never serves the old weights."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from loradock.registry import Registry
from loradock.runtime import AdapterNotFoundError, GenerationRequest, SamplingParams

from tests.conftest import TINY_BASE
from tests.reliability.conftest import derive_adapter, scaled
from tests.reliability.probes import rss_mib
from tests.runtime.conftest import load_peft_oracle, one_thread, oracle_greedy

CYCLES = scaled(1000)
WARMUP = 50
RSS_GROWTH_BOUND_MIB = 24.0
NAMES = ("c0", "c1", "c2", "c3", "c4")
PROMPT = "The quick brown fox"
NEW_TOKENS = 6


@pytest.fixture
def churn_dirs(templates, tmp_path: Path) -> dict[str, Path]:
    return {name: derive_adapter(templates["all" if i % 2 else "qv"], tmp_path / name, seed=500 + i)
            for i, name in enumerate(NAMES)}


def _engine(registry: Registry, **overrides):
    from loradock.runtime import Engine, EngineConfig

    config = dict(base=TINY_BASE, quantize="none", device="cpu", max_slots=2, max_rank=16,
                  host_cache_bytes=64 * 1024, max_host_adapters=2, max_running=4, max_batch_tokens=64,
                  max_model_len=256, max_prompt_tokens=128, kv_cache_tokens=1024, registry_poll_s=0.0)
    return Engine(EngineConfig(**{**config, **overrides}), registry).start(run_loop=False)


def _ask(engine, ref: str, n: int = NEW_TOKENS):
    return engine.generate(GenerationRequest(adapter=ref, prompt=PROMPT,
                                             sampling=SamplingParams(max_new_tokens=n, ignore_eos=True)))


def test_thousand_load_evict_cycles(registry: Registry, tiny_base, churn_dirs, figures):
    for name, path in churn_dirs.items():
        registry.publish(path, name, base=TINY_BASE)
    with one_thread():
        engine = _engine(registry)
        try:
            rss_start = None
            for i in range(CYCLES):  # round robin over 5 adapters, 2 slots: every request evicts
                result = _ask(engine, NAMES[i % len(NAMES)], n=1)
                assert result.completion_tokens == 1
                if i == WARMUP:
                    rss_start = rss_mib(os.getpid())
            rss_end = rss_mib(os.getpid())
            stats = engine.stats()
            evictions = sum(a.get("evictions", 0) for a in stats["adapters"].values())
            loads = sum(a.get("loads", 0) for a in stats["adapters"].values())
            resident = engine.resident_adapters()
            assert evictions >= CYCLES - 2  # each request after the first two evicted someone
            assert loads >= CYCLES - 2  # and re-read its adapter from the registry (host cache: 2)
            assert sum(r.tier == "device" for r in resident) <= 2
            assert sum(r.tier == "host" for r in resident) <= 2
            assert stats["host_cache_bytes_used"] <= 64 * 1024
            assert (stats["running"], stats["waiting"], stats["kv_tokens_reserved"]) == (0, 0, 0)

            # after the churn every adapter still gives PEFT's answer
            oracle = load_peft_oracle(tiny_base.path, churn_dirs, "none")
            ids = engine.tokenizer.encode(PROMPT)
            outputs = {}
            for name in NAMES:
                got = _ask(engine, name).token_ids
                assert list(got) == oracle_greedy(oracle, name, ids, NEW_TOKENS), name
                outputs[name] = got
            assert len(set(outputs.values())) == len(NAMES)  # they differ, so the check can fail
        finally:
            engine.shutdown(drain=False, timeout=5)
    growth = rss_end - rss_start
    figures(cycles=CYCLES, evictions=evictions, loads=loads, rss_start_mib=round(rss_start, 1),
            rss_growth_mib=round(growth, 1), oracle_matches=len(NAMES))
    assert growth <= RSS_GROWTH_BOUND_MIB, f"RSS grew {growth:.1f} MiB over {CYCLES} cycles"


def test_same_name_republish_never_serves_stale_weights(registry: Registry, tiny_base, churn_dirs, figures):
    """`swap@1` is deleted, its name wiped (version counter too) and published again with other
    weights: the very same reference `swap@1` must now give the new adapter's answer."""
    first, second = churn_dirs["c0"], churn_dirs["c1"]
    old = registry.publish(first, "swap", base=TINY_BASE)
    with one_thread():
        engine = _engine(registry)
        try:
            oracle = load_peft_oracle(tiny_base.path, {"first": first, "second": second}, "none")
            ids = engine.tokenizer.encode(PROMPT)
            want_first = oracle_greedy(oracle, "first", ids, NEW_TOKENS)
            want_second = oracle_greedy(oracle, "second", ids, NEW_TOKENS)
            assert want_first != want_second
            assert list(_ask(engine, "swap@1").token_ids) == want_first  # now resident on device and host

            registry.delete("swap@1")  # through the registry: the generation moves
            with pytest.raises(AdapterNotFoundError):
                _ask(engine, "swap@1")
            # wipe the name (its version counter too), as a restore from backup might
            swap_dir = registry.root / "adapters" / "swap"
            for p in swap_dir.rglob("*"):
                p.chmod(0o755 if p.is_dir() else 0o644)
            shutil.rmtree(swap_dir)
            new = registry.publish(second, "swap", base=TINY_BASE)
            assert new.ref == old.ref == "swap@1" and new.digest != old.digest
            for ref in ("swap@1", "swap"):
                result = _ask(engine, ref)
                assert result.adapter.digest == new.digest
                assert list(result.token_ids) == want_second, f"{ref} served the deleted weights"
        finally:
            engine.shutdown(drain=False, timeout=5)
    figures(old_digest=old.digest[:12], new_digest=new.digest[:12], same_ref=new.ref)
