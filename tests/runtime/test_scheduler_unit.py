"""The scheduler alone, with fake sequences and a real (tiny) KV pool: budgets, round-robin
admission, and preemption when the pool runs dry."""

from __future__ import annotations

import torch
from loradock.runtime.kv_cache import KVPool, blocks_for
from loradock.runtime.scheduler import Admission, Scheduler
from loradock.runtime.sequence import SeqStatus, Sequence


class FakeSeq:
    """The part of `Sequence` the scheduler reads."""

    in_prefill = Sequence.in_prefill
    num_tokens = Sequence.num_tokens

    def __init__(self, name: str, adapter: str | None, prompt_len: int) -> None:
        self.name, self.adapter = name, adapter
        self.prompt_ids, self.output_ids, self.in_flight, self.max_len = [1] * prompt_len, [], 0, 10**6
        self.computed, self.blocks, self.status = 0, [], SeqStatus.WAITING

    def __repr__(self) -> str:
        return self.name


class Harness:
    def __init__(self, blocks: int, block_size: int = 4, **limits) -> None:
        self.pool = KVPool(1, 1, 1, blocks, block_size, torch.float32, torch.device("cpu"))
        self.sched = Scheduler(**{"max_running": 8, "max_batch_tokens": 64, "max_queue": 64, **limits})
        self.preempted: list[str] = []

    def admit(self, seq) -> Admission:
        """As the engine does: admit while the pool holds the sequence's tokens."""
        fits = self.pool.free_blocks >= blocks_for(seq.num_tokens, self.pool.block_size)
        return Admission.ADMIT if fits else Admission.WAIT

    def grow(self, seq, n: int) -> bool:
        return self.pool.grow(seq.blocks, seq.computed + n)

    def preempt(self, seq) -> None:
        self.pool.free(seq.blocks)
        seq.computed = 0
        self.preempted.append(seq.name)

    def step(self) -> list[tuple[str, int]]:
        """Schedule, then pretend the forward ran: each planned sequence computed its tokens and
        those that reached their end sampled one more."""
        plan = self.sched.schedule(self.admit, self.grow, self.preempt)
        for seq, n in plan:
            seq.computed += n
            if seq.computed == seq.num_tokens:
                seq.output_ids.append(7)
        return [(s.name, n) for s, n in plan]


def test_decode_first_then_chunks_within_the_token_budget():
    h = Harness(blocks=64, max_batch_tokens=10, max_running=3)
    a, b = FakeSeq("a", None, 3), FakeSeq("b", "x", 20)
    h.sched.add(a)
    h.sched.add(b)
    assert h.step() == [("a", 3), ("b", 7)], "a's whole prompt, then b's first chunk"
    assert h.step() == [("a", 1), ("b", 9)], "a decodes first, b's prompt continues"
    assert h.step() == [("a", 1), ("b", 4)]


def test_admission_round_robins_over_adapters():
    h = Harness(blocks=64, max_batch_tokens=64, max_running=3)
    for name, adapter in [("x1", "x"), ("x2", "x"), ("x3", "x"), ("y1", "y")]:
        h.sched.add(FakeSeq(name, adapter, 2))
    assert [name for name, _ in h.step()] == ["x1", "y1", "x2"], "y is not starved behind x's queue"


def test_pool_running_dry_preempts_the_newest_and_the_oldest_progresses():
    h = Harness(blocks=4, block_size=4, max_running=3)  # 16 tokens of KV
    seqs = [FakeSeq(name, None, 4) for name in "abc"]
    for s in seqs:
        h.sched.add(s)
    assert h.step() == [("a", 4), ("b", 4), ("c", 4)]  # 3 blocks taken, 1 free
    assert h.step() == [("a", 1), ("b", 1)] and h.preempted == ["c"], \
        "a's fifth token takes the last block; b's needs one more, so c (the newest) gives its up"
    c = seqs[2]
    assert c.status is SeqStatus.WAITING and c.blocks == [] and h.sched.waiting() == [c]
    for _ in range(20):
        h.step()
        if len(seqs[0].output_ids) >= 8:
            break
    assert len(seqs[0].output_ids) >= 8, "the oldest sequence keeps decoding while the pool is short"
    assert h.pool.free_blocks + sum(len(s.blocks) for s in seqs) == 4, "no block lost"


def test_a_preempted_sequence_goes_back_ahead_of_newer_waiting_ones():
    """Guards re-queueing a preempted sequence at the back: it held KV and had made progress,
    so it runs again before requests that arrived after it."""
    h = Harness(blocks=4, block_size=4, max_running=3)  # 16 tokens of KV
    a, b, c, d = (FakeSeq(name, None, 4) for name in "abcd")
    for s in (a, b, c, d):
        h.sched.add(s)
    assert h.step() == [("a", 4), ("b", 4), ("c", 4)]  # d waits: max_running
    assert h.step() == [("a", 1), ("b", 1)] and h.preempted == ["c"]
    assert h.sched.waiting() == [c, d], "c was admitted before d arrived: it waits ahead of d"
    h.sched.finish(a)  # a finishes: its blocks and its running place free up
    h.pool.free(a.blocks)
    assert [name for name, _ in h.step()][-1] == "c", "c is admitted again, not d"
    assert h.sched.waiting() == [d]
