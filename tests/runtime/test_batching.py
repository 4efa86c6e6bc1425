"""Batching maths: pure functions, parametrized."""

from __future__ import annotations

import doctest

import pytest
import torch
from loradock.runtime import batching, cuda_graphs, kv_cache, triton_attention, triton_lora


@pytest.mark.parametrize(("slots", "want"), [
    ([], []),
    ([0], [(0, 1, 0)]),
    ([0, 0, 3, 3, 3, 1], [(0, 2, 0), (2, 5, 3), (5, 6, 1)]),
    ([2, 1, 2], [(0, 1, 2), (1, 2, 1), (2, 3, 2)]),
    ([5] * 4, [(0, 4, 5)]),
])
def test_find_runs(slots, want):
    assert batching.find_runs(slots) == want


@pytest.mark.parametrize(("slots", "want"), [
    ([3, 0, 1, 0, 3], [1, 3, 2, 0, 4]),  # stable: FCFS kept inside a slot
    ([], []),
    ([1, 1], [0, 1]),
])
def test_order_by_slot(slots, want):
    assert batching.order_by_slot(slots) == want


@pytest.mark.parametrize(("chunks", "cu"), [
    ([[5], [6, 7], [8, 9, 10]], [0, 1, 3, 6]),
    ([[1, 2, 3]], [0, 3]),
])
def test_pack_tokens(chunks, cu):
    ids, cu_lens = batching.pack_tokens(chunks)
    assert cu_lens == cu
    assert ids.tolist() == [t for c in chunks for t in c]
    for i, c in enumerate(chunks):
        assert ids[cu_lens[i]:cu_lens[i + 1]].tolist() == c


def test_pack_tokens_rejects_empty_chunk():
    with pytest.raises(ValueError, match="at least one token"):
        batching.pack_tokens([[1], []])


@pytest.mark.parametrize(("past", "lens", "want"), [
    ([0, 7, 3], [3, 1, 2], [0, 1, 2, 7, 3, 4]),  # prefill, decode, later prefill chunk
    ([10], [1], [10]),
    ([], [], []),
])
def test_position_ids(past, lens, want):
    assert batching.position_ids(past, lens).tolist() == want


@pytest.mark.parametrize(("seq_slots", "lens", "want"), [
    ([0, 2, 1], [2, 1, 3], [0, 0, 2, 1, 1, 1]),
    ([4], [1], [4]),
])
def test_token_slots(seq_slots, lens, want):
    got = batching.token_slots(seq_slots, lens)
    assert got == want


@pytest.mark.parametrize(("cu", "wants", "every", "want"), [
    ([0, 3, 4, 9], [True, True, False], [False] * 3, ([2, 3], [0, 1, None], [None] * 3)),  # third: mid-prefill
    ([0, 1, 2], [True, True], [False] * 2, ([0, 1], [0, 1], [None] * 2)),
    ([0, 5], [False], [False], ([], [None], [None])),
    ([0, 2, 5], [True, False], [False, True], ([1, 2, 3, 4], [0, None], [None, 1])),  # all of a mid-prefill chunk
])
def test_logit_rows(cu, wants, every, want):
    assert batching.logit_rows(cu, wants, every) == want


@pytest.mark.parametrize(("slots", "want"), [
    ([1, 2, 3], ([(1, 4)], 1, None, None, [])),  # decode on distinct slots: the tokens are the block
    ([2, 2, 3, 3], ([(2, 4)], 2, None, None, [])),
    ([0, 0, 2], ([(0, 3)], 2, [0, 1, 4], None, [])),  # slot 1 has no tokens: its rows stay zero
    ([5, 5, 5, 6], ([(5, 7)], 3, [0, 1, 2, 3], None, [])),  # slot 6 padded to the widest slot
    ([3, 1, 3], ([(1, 4)], 2, [4, 0, 5], None, [])),  # unsorted: rows follow the slot, then arrival
    ([1] + [2] * 9 + [3], ([(1, 4)], 1, [0, 2], [0, 10], [(1, 10, 2)])),  # a prompt chunk among decodes
    ([4] * 9, ([], 1, None, [], [(0, 9, 4)])),  # a prompt chunk alone: nothing blocked
    ([], ([], 1, None, None, [])),
    ([1, 2, 30, 31], ([(1, 3), (30, 32)], 1, None, None, [])),  # 27 empty slots apart: two ranges
    ([30, 1, 30, 2], ([(1, 3), (30, 31)], 2, [4, 0, 5, 2], None, [])),  # rows of the second range follow the first's
    ([1, 6, 6], ([(1, 7)], 2, [0, 10, 11], None, [])),  # 4 empty slots: still one range
])
def test_slot_groups(slots, want):
    g = batching.slot_groups(slots, batching.find_runs(slots), torch.device("cpu"))
    as_list = lambda t: None if t is None else t.tolist()  # noqa: E731
    assert (list(g.ranges), g.width, as_list(g.token_rows), as_list(g.blocked), list(g.long_runs)) == want
    assert g.num_blocked == len(slots) - sum(end - start for start, end, _ in g.long_runs)


@pytest.mark.parametrize("module", [batching, kv_cache, cuda_graphs, triton_attention, triton_lora])
def test_doctests(module):
    """The examples in the batching maths' docstrings are tests too."""
    assert doctest.testmod(module).failed == 0


def test_block_tables_and_positions_equal_the_plain_python_build():
    g = torch.Generator().manual_seed(3)
    tables = [torch.randint(1, 999, (int(n),), generator=g).tolist() for n in torch.randint(1, 40, (23,), generator=g)]
    width = max(map(len, tables))
    want = torch.tensor([[*t, *[0] * (width - len(t))] for t in tables])
    assert torch.equal(batching.block_tables(tables), want)
    assert torch.equal(batching.block_tables(tables, width + 5)[:, :width], want)
    past, chunks = [len(t) for t in tables], [1 + i % 5 for i in range(len(tables))]
    assert batching.position_ids(past, chunks).tolist() == [p + i for p, n in zip(past, chunks, strict=True)
                                                           for i in range(n)]
