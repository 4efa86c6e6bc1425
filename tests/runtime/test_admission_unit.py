"""Admission alone, with a fake adapter cache and a real (tiny) KV pool: a sequence takes its
slot and its KV blocks together or not at all, waits while its adapter loads, and is dropped
with an error that names the adapter when the adapter cannot be served."""

from __future__ import annotations

import logging

import pytest
import torch
from loradock.runtime.adapter_cache import LoadState
from loradock.runtime.admission import Admitter
from loradock.runtime.block_manager import BlockManager
from loradock.runtime.errors import AdapterUnavailableError, EngineError
from loradock.runtime.kv_cache import KVPool
from loradock.runtime.scheduler import Admission
from loradock.runtime.sequence import Sequence
from loradock.runtime.stats import BASE_KEY, EngineStats
from loradock.runtime.types import ResolvedAdapter

BLOCK = 4
LAW = ResolvedAdapter("law", 1, "d1")


class FakeCache:
    """An adapter cache with one adapter whose state the test sets; counts pins."""

    def __init__(self, state: LoadState = LoadState.READY, slot: int | None = 3,
                 error: BaseException | None = None, write_fails: bool = False) -> None:
        self.load_state, self.slot, self.error, self.write_fails = state, slot, error, write_fails
        self.pins = 0
        self.prefetched: list[ResolvedAdapter] = []

    def state(self, key):
        return self.load_state, self.error

    def prefetch(self, key):
        self.prefetched.append(key)
        self.load_state = LoadState.LOADING

    def acquire(self, key):
        if self.write_fails:
            raise RuntimeError("slot write failed: device out of memory")
        if self.slot is not None:
            self.pins += 1
        return self.slot

    def release(self, key):
        assert self.pins > 0, "released a pin that was never taken"
        self.pins -= 1


class FakeSeq:
    """The part of `Sequence` admission and the block manager use."""

    num_tokens = Sequence.num_tokens
    in_flight = 0
    full_block_hashes = Sequence.full_block_hashes
    kv_context = Sequence.kv_context
    reads_prefix_cache = True

    def __init__(self, adapter: ResolvedAdapter | None, prompt_len: int) -> None:
        self.adapter = adapter
        self.prompt_ids, self.output_ids = list(range(100, 100 + prompt_len)), []
        self.computed, self.blocks, self.block_hashes = 0, [], []
        self.slot, self.admitted_at = 0, None


def harness(cache: FakeCache, blocks: int = 8) -> tuple[Admitter, KVPool, EngineStats]:
    pool = KVPool(1, 1, 1, blocks, BLOCK, torch.float32, torch.device("cpu"))
    stats = EngineStats()
    return Admitter(cache, BlockManager(pool, prefix_caching=True), stats), pool, stats


def test_a_ready_adapter_and_room_admit_with_slot_and_blocks_taken():
    cache = FakeCache(slot=3)
    admitter, pool, _ = harness(cache)
    seq = FakeSeq(LAW, prompt_len=9)
    assert admitter.admit(seq, others_running=False) == (Admission.ADMIT, None)
    assert (seq.slot, cache.pins) == (3, 1)
    assert pool.grow(seq.blocks, seq.num_tokens)  # the scheduler's first chunk takes its blocks
    first = seq.admitted_at
    assert first is not None
    admitter.release(seq)  # preempted: everything goes back
    assert (seq.slot, cache.pins, seq.blocks, pool.free_blocks) == (0, 0, [], pool.num_blocks)
    assert admitter.admit(seq, others_running=False)[0] is Admission.ADMIT
    assert seq.admitted_at == first  # readmission keeps the first admission time


def test_no_kv_room_gives_the_slot_back_and_waits():
    cache = FakeCache(slot=3)
    admitter, pool, _ = harness(cache, blocks=2)  # 8 tokens
    seq = FakeSeq(LAW, prompt_len=9)
    assert admitter.admit(seq, others_running=False) == (Admission.WAIT, None)
    assert (seq.slot, cache.pins, seq.blocks, pool.free_blocks) == (0, 0, [], 2)


def test_the_watermark_applies_only_next_to_running_sequences():
    cache = FakeCache()
    admitter, _, _ = harness(cache, blocks=3)  # 12 tokens; watermark 1 block
    assert admitter.admit(FakeSeq(LAW, prompt_len=12), others_running=True)[0] is Admission.WAIT
    assert cache.pins == 0
    assert admitter.admit(FakeSeq(LAW, prompt_len=12), others_running=False)[0] is Admission.ADMIT


@pytest.mark.parametrize("state", [LoadState.LOADING, LoadState.ABSENT])
def test_an_adapter_not_on_the_host_waits_and_an_absent_one_is_read_again(state):
    cache = FakeCache(state=state)
    admitter, pool, _ = harness(cache)
    seq = FakeSeq(LAW, prompt_len=5)
    assert admitter.admit(seq, others_running=False) == (Admission.WAIT, None)
    assert cache.prefetched == ([LAW] if state is LoadState.ABSENT else [])
    assert (cache.pins, seq.blocks, pool.free_blocks) == (0, [], pool.num_blocks)


def test_no_free_slot_waits_without_taking_blocks():
    cache = FakeCache(slot=None)
    admitter, pool, _ = harness(cache)
    assert admitter.admit(FakeSeq(LAW, prompt_len=5), others_running=True) == (Admission.WAIT, None)
    assert pool.free_blocks == pool.num_blocks


def test_a_failed_load_drops_with_an_error_naming_the_adapter():
    cache = FakeCache(state=LoadState.FAILED, error=ValueError("lora_A of q_proj has shape (4, 3)"))
    admitter, pool, _ = harness(cache)
    admission, error = admitter.admit(FakeSeq(LAW, prompt_len=5), others_running=False)
    assert admission is Admission.DROP
    assert isinstance(error, AdapterUnavailableError)
    assert "law@1" in str(error) and "lora_A of q_proj" in str(error)
    assert (cache.pins, pool.free_blocks) == (0, pool.num_blocks)


def test_an_engine_error_from_the_load_is_kept_as_it_is():
    refused = EngineError("law@1 is not signed by a trusted key")
    admitter, _, _ = harness(FakeCache(state=LoadState.FAILED, error=refused))
    assert admitter.admit(FakeSeq(LAW, prompt_len=5), others_running=False) == (Admission.DROP, refused)


def test_a_failing_slot_write_drops_the_request_and_logs_it(caplog):
    admitter, pool, _ = harness(FakeCache(write_fails=True))
    with caplog.at_level(logging.ERROR, logger="loradock.runtime.admission"):
        admission, error = admitter.admit(FakeSeq(LAW, prompt_len=5), others_running=False)
    assert admission is Admission.DROP
    assert "law@1" in str(error) and "out of memory" in str(error)
    assert "placing adapter law@1" in caplog.text
    assert pool.free_blocks == pool.num_blocks


def test_the_base_model_needs_no_slot_and_cached_prefixes_are_counted():
    cache = FakeCache()
    admitter, pool, stats = harness(cache)
    first = FakeSeq(None, prompt_len=9)
    assert admitter.admit(first, others_running=False)[0] is Admission.ADMIT
    assert (first.slot, cache.pins) == (0, 0)
    assert pool.grow(first.blocks, first.num_tokens)
    pool.register(first.blocks[0], first.full_block_hashes(BLOCK)[0])
    pool.register(first.blocks[1], first.full_block_hashes(BLOCK)[1])
    admitter.release(first)
    again = FakeSeq(None, prompt_len=9)  # the same 9 tokens: 2 full blocks come from the cache
    assert admitter.admit(again, others_running=False)[0] is Admission.ADMIT
    assert again.computed == 8
    assert stats.snapshot()[BASE_KEY]["cached_prompt_tokens"] == 8
