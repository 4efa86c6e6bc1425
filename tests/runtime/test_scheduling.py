"""Continuous batching on the tiny model: joining mid-decode, chunked prefill, slots under pressure."""

from __future__ import annotations

import threading

import pytest
from loradock.runtime import GenerationRequest, SamplingParams
from loradock.runtime.sequence import SeqStatus

from tests.runtime.conftest import SPECS, drive, load_peft_oracle, oracle_greedy


def req(adapter, prompt, n=8, **kw):
    return GenerationRequest(adapter=adapter, prompt=prompt,
                             sampling=SamplingParams(max_new_tokens=n, ignore_eos=True, **kw))


LONG_PROMPT = " ".join(f"item {i}," for i in range(30))  # ~90 tokens: several prefill chunks


def test_request_joining_mid_decode_gets_its_solo_tokens(tiny_registry, tiny_base, engine_factory):
    # Prefix caching off: the solo runs below would leave b's prompt cached, and it is the chunked
    # prefill of that prompt next to a's decoding that this test is about.
    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=False, max_batch_tokens=24,
                            max_running=8, prefix_caching=False)
    solo = {key: engine.generate(r).token_ids for key, r in {
        "a": req("law", "The weather today", 12),
        "b": req("med", LONG_PROMPT, 6),
        "c": req(None, "Hello world", 6),
    }.items()}

    a = engine.submit(req("law", "The weather today", 12))
    events_a = iter(a)
    for _ in range(4):
        engine.step()
    b = engine.submit(req("med", LONG_PROMPT, 6))
    c = engine.submit(req(None, "Hello world", 6))
    b_seq = engine._seqs[b.request_id]
    a_seq = engine._seqs[a.request_id]
    decoded_during_b_prefill = []
    while b_seq.in_prefill:
        before = len(a_seq.output_ids)
        engine.step()
        decoded_during_b_prefill.append(len(a_seq.output_ids) - before)
    assert len(decoded_during_b_prefill) >= 3, "the long prompt should be prefilled in chunks"
    assert all(n == 1 for n in decoded_during_b_prefill), "a kept decoding while b was prefilled"
    drive(engine, [a, b, c])
    assert a.result().token_ids == solo["a"]
    assert b.result().token_ids == solo["b"]
    assert c.result().token_ids == solo["c"]
    assert [e.token_id for e in events_a] == list(solo["a"]), "streamed tokens equal the result"


def test_more_adapters_than_slots(tiny_registry, tiny_base, tiny_adapter_dirs, engine_factory):
    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=False, max_slots=3, max_running=16)
    in_use_evictions = []
    write = engine.cache._write_layers

    def checked_write(slot, loaded):  # the slot being (over)written must not serve a running request
        users = [s.request_id for s in engine.scheduler.running if s.slot == slot]
        if users and engine.cache._slot_key[slot] is not None:
            in_use_evictions.append((slot, users))
        write(slot, loaded)

    engine.cache._write_layers = checked_write
    names = [s.name for s in SPECS[:6]]
    prompts = ["Alpha beta", "Gamma delta epsilon", "One two"]
    work = [(names[i % 6], prompts[i % 3], 3 + i % 4) for i in range(18)]
    handles = [engine.submit(req(a, p, n)) for a, p, n in work]
    drive(engine, handles)

    oracle = load_peft_oracle(tiny_base.path, {n: tiny_adapter_dirs[n] for n in names}, "none")
    for (adapter, prompt, n), h in zip(work, handles, strict=True):
        want = oracle_greedy(oracle, adapter, engine.tokenizer.encode(prompt), n)
        assert list(h.result().token_ids) == want, adapter
    stats = engine.stats()["adapters"]
    assert sum(c["evictions"] for c in stats.values()) > 0, "6 adapters through 3 slots must evict"
    assert in_use_evictions == []
    assert stats["law@1"]["loads"] == 1, "a re-used adapter comes from host memory, not the disk"
    assert sum(c["cache_hits"] for c in stats.values()) > 0
    assert engine.stats()["kv_tokens_reserved"] == 0 and engine.stats()["running"] == 0


def test_fairness_rare_adapter_is_not_starved(tiny_registry, tiny_base, engine_factory):
    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=False, max_running=2)
    for name in ("law", "med"):  # resident up front, so only the scheduler decides the order
        engine.load_adapter(name)
    popular = [engine.submit(req("law", "Popular request", 4)) for _ in range(8)]
    rare = engine.submit(req("med", "Rare request", 4))
    seqs = {h.request_id: engine._seqs[h.request_id] for h in [*popular, rare]}
    drive(engine, [*popular, rare])
    order = sorted(seqs, key=lambda rid: seqs[rid].admitted_at)
    # FCFS would admit the rare adapter's request last (9th); round-robin takes it second.
    assert order.index(rare.request_id) == 1


@pytest.mark.parametrize("ops", ["reference", "segmented", "batched", "gathered"])
def test_lora_ops_choice_gives_same_tokens(tiny_registry, tiny_base, engine_factory, ops):
    auto = engine_factory(tiny_registry, tiny_base.name, run_loop=False, max_slots=4)
    other = engine_factory(tiny_registry, tiny_base.name, run_loop=False, max_slots=4, lora_ops=ops)
    work = [("law", "Hi there"), ("chem", "Numbers: 1 2 3"), ("math", "Why"), (None, "Base")]
    outs = []
    for engine in (auto, other):
        handles = [engine.submit(req(a, p, 5)) for a, p in work]
        drive(engine, handles)
        outs.append([h.result().token_ids for h in handles])
    assert outs[0] == outs[1]


def test_adapter_loading_overlaps_decoding(tiny_registry, tiny_base, engine_factory):
    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=False)
    release = threading.Event()
    read = engine.cache._load

    def slow_read(key):  # the registry read blocks until the test lets it finish
        assert threading.current_thread().name.startswith("loradock-load"), "loads run off the loop"
        release.wait(30)
        return read(key)

    engine.cache._load = slow_read
    running = engine.submit(req(None, "Base model request", 30))
    engine.step()
    waiting = engine.submit(req("code", "Adapter request", 3))  # prefetch starts now
    seq = engine._seqs[running.request_id]
    before = len(seq.output_ids)
    for _ in range(5):
        engine.step()
    assert len(seq.output_ids) == before + 5, "decoding continued while the adapter loaded"
    assert not waiting.done and engine._seqs[waiting.request_id].status is SeqStatus.WAITING
    release.set()
    drive(engine, [running, waiting])
    assert waiting.result().completion_tokens == 3
