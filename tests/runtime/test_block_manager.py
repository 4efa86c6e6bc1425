"""The block manager alone, with fake sequences and a real (tiny) KV pool: admission by free blocks
and watermark, the prefix cache at admission, registration of filled blocks, release."""

from __future__ import annotations

import torch
from loradock.runtime.block_manager import BlockManager
from loradock.runtime.kv_cache import KVPool
from loradock.runtime.sequence import Sequence


class FakeSeq:
    """The part of `Sequence` the block manager reads and writes."""

    num_tokens = Sequence.num_tokens
    in_flight = 0
    kv_context = Sequence.kv_context
    full_block_hashes = Sequence.full_block_hashes
    reads_prefix_cache = True

    def __init__(self, prompt: list[int], adapter=None) -> None:
        self.prompt_ids, self.output_ids, self.adapter = list(prompt), [], adapter
        self.blocks: list[int] = []
        self.block_hashes: list[bytes] = []
        self.computed = 0


def manager(blocks: int, prefix_caching: bool = True) -> BlockManager:
    return BlockManager(KVPool(1, 1, 1, blocks, 4, torch.float32, torch.device("cpu")), prefix_caching)


def run_prompt(bm: BlockManager, seq: FakeSeq) -> None:
    """Admit seq and compute its whole prompt in one chunk, as a step would."""
    assert bm.admit(seq, others_running=False)
    n = seq.num_tokens - seq.computed
    assert bm.grow(seq, n)
    bm.computed(seq, n)


def test_admission_needs_room_for_every_token_plus_the_watermark_when_others_run():
    bm = manager(200)  # watermark: 2 blocks
    running = FakeSeq(list(range(4 * 190)))
    run_prompt(bm, running)  # 190 blocks held, 10 free
    waiting = FakeSeq(list(range(1000, 1000 + 4 * 9)))  # needs 9 blocks
    assert not bm.admit(waiting, others_running=True), "9 + 2 watermark > 10 free"
    assert waiting.blocks == [] and bm.pool.free_blocks == 10, "a refusal takes nothing"
    assert bm.admit(waiting, others_running=False), "alone it may use the watermark too"


def test_a_shared_prefix_is_taken_from_the_cache_leaving_one_token_to_compute():
    bm = manager(16)
    first = FakeSeq(list(range(12)), adapter=None)  # 3 full blocks
    run_prompt(bm, first)
    bm.release(first)
    assert bm.pool.cached_blocks == 3
    same = FakeSeq(list(range(12)))
    assert bm.admit(same, others_running=False)
    # Guards against taking every block of an exact repeat: the last token must be computed again.
    assert same.computed == 8 and len(same.blocks) == 2
    longer = FakeSeq([*range(12), 99, 98])
    assert bm.admit(longer, others_running=False)
    assert longer.computed == 12 and longer.blocks[:2] == same.blocks
    other = FakeSeq([7, *range(1, 12)])
    assert bm.admit(other, others_running=False) and other.computed == 0, "a different start"


def test_only_full_blocks_are_registered_and_release_returns_everything():
    bm = manager(8)
    seq = FakeSeq(list(range(6)))
    run_prompt(bm, seq)  # 6 tokens: one full block, one partial
    assert bm.pool.cached_blocks == 1
    seq.output_ids += [50, 51]  # two decode steps fill the second block
    for _ in range(2):
        assert bm.grow(seq, 1)
        bm.computed(seq, 1)
    assert seq.computed == 8 and bm.pool.cached_blocks == 2
    bm.release(seq)
    assert seq.blocks == [] and seq.computed == 0 and bm.pool.free_blocks == 8


def test_prefix_caching_off_never_registers_or_takes():
    bm = manager(8, prefix_caching=False)
    run_prompt(bm, FakeSeq(list(range(8))))
    again = FakeSeq(list(range(8)))
    assert bm.admit(again, others_running=False) and again.computed == 0
    assert bm.pool.cached_blocks == 0
