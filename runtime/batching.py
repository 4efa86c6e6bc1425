"""Batching maths as small pure functions.

One engine step packs the new tokens of every scheduled sequence into a single
row (`input_ids` [1, T]); these helpers build the per-token bookkeeping that the
attention function and the LoRA layers read. Sequences are ordered by adapter
slot before packing, so tokens of one adapter form contiguous runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain, pairwise
from typing import NamedTuple

import numpy as np
import torch

from .transfer import to_device


def order_by_slot(slots: Sequence[int]) -> list[int]:
    """Indices that sort sequences by adapter slot, stable (FCFS order kept within a slot)."""
    return sorted(range(len(slots)), key=lambda i: slots[i])


def pack_tokens(chunks: Sequence[Sequence[int]]) -> tuple[torch.Tensor, list[int]]:
    """Concatenate per-sequence token chunks.

    Returns (input_ids [T], cu_lens [num_seqs + 1]) where sequence i owns
    input_ids[cu_lens[i]:cu_lens[i + 1]].
    """
    cu_lens = [0]
    flat: list[int] = []
    for chunk in chunks:
        if len(chunk) == 0:
            raise ValueError("every scheduled sequence needs at least one token")
        flat.extend(chunk)
        cu_lens.append(len(flat))
    return torch.tensor(flat, dtype=torch.long), cu_lens


def fed_rows(items: Sequence) -> tuple[list[int], list[int]]:
    """For the items (StepItems, in packing order) whose last token is still in flight on the
    device (`fed_from` set): (its row in the packed tokens, its row in the sampled tokens).

    >>> from types import SimpleNamespace as Item
    >>> fed_rows([Item(tokens=[7, 8], fed_from=None), Item(tokens=[-1], fed_from=3), Item(tokens=[-1], fed_from=0)])
    ([2, 3], [3, 0])
    """
    rows, sources, end = [], [], 0
    for item in items:
        end += len(item.tokens)
        if item.fed_from is not None:
            rows.append(end - 1)
            sources.append(item.fed_from)
    return rows, sources


def feed_sampled(input_ids: torch.Tensor, items: Sequence, sampled: torch.Tensor | None) -> None:
    """Write into `input_ids` [T] (on the device) each in-flight token `items` wait for, from
    the previous step's `sampled` tokens [rows] (on the device): no read back in between."""
    rows, sources = fed_rows(items)
    if not rows:
        return
    if sampled is None:
        raise ValueError(f"{len(rows)} sequences wait for tokens in flight, and no sampled tokens were given")
    input_ids.index_copy_(0, to_device(rows, input_ids.device),
                          sampled.index_select(0, to_device(sources, sampled.device)).to(input_ids.dtype))


def position_ids(past_lens: Sequence[int], chunk_lens: Sequence[int]) -> torch.Tensor:
    """Positions of the packed tokens: sequence i continues from its cached length.

    past_lens [num_seqs], chunk_lens [num_seqs] -> positions [T]

    >>> position_ids([5, 0], [1, 3]).tolist()
    [5, 0, 1, 2]
    """
    chunks = torch.tensor(chunk_lens, dtype=torch.long)
    starts = torch.cumsum(chunks, 0) - chunks  # each sequence's first packed token
    return torch.arange(int(chunks.sum())) + torch.repeat_interleave(torch.tensor(past_lens, dtype=torch.long)
                                                                     - starts, chunks)


def block_tables(tables: Sequence[Sequence[int]], width: int | None = None) -> torch.Tensor:
    """The sequences' block tables as one tensor [num_seqs, width] (zero-padded; by default as
    wide as the longest), built in C: no Python work per block, which at 64 sequences of 2,048
    tokens (8,192 blocks) is a millisecond of a GPU step.

    >>> block_tables([[3, 1], [2]]).tolist(), block_tables([[4]], 3).tolist()
    ([[3, 1], [2, 0]], [[4, 0, 0]])
    """
    lens = np.fromiter(map(len, tables), dtype=np.int64, count=len(tables))
    width = int(lens.max(initial=0)) if width is None else width
    out = np.zeros((len(tables), width), dtype=np.int64)
    out[np.arange(width)[None, :] < lens[:, None]] = np.fromiter(chain.from_iterable(tables), dtype=np.int64,
                                                                  count=int(lens.sum()))
    return torch.from_numpy(out)


def token_slots(seq_slots: Sequence[int], chunk_lens: Sequence[int]) -> list[int]:
    """Adapter slot of every packed token.  seq_slots [num_seqs], chunk_lens [num_seqs] -> [T]

    >>> token_slots([0, 2], [2, 1])
    [0, 0, 2]
    """
    return [s for s, n in zip(seq_slots, chunk_lens, strict=True) for _ in range(n)]


def find_runs(slots: Sequence[int]) -> list[tuple[int, int, int]]:
    """The runs of a token -> slot map: maximal stretches of one slot, [(start, end, slot), ...],
    end exclusive.

    >>> find_runs([0, 0, 3, 3, 3, 1])
    [(0, 2, 0), (2, 5, 3), (5, 6, 1)]
    """
    runs: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(slots) + 1):
        if i == len(slots) or slots[i] != slots[start]:
            runs.append((start, i, int(slots[start])))
            start = i
    return runs


def run_pieces(runs: Sequence[tuple[int, int, int]], piece: int) -> list[tuple[int, int, int]]:
    """Runs (start, end, slot) cut into rows (start, length, slot) of at most `piece` tokens: the
    run table of a captured step, whose LoRA kernels run one program per row and column block.

    >>> run_pieces([(0, 5, 2), (5, 6, 0)], 4)
    [(0, 4, 2), (4, 1, 2), (5, 1, 0)]
    """
    return [(s, min(piece, end - s), slot) for start, end, slot in runs for s in range(start, end, piece)]


def logit_rows(cu_lens: Sequence[int], wants_logits: Sequence[bool],
               all_logits: Sequence[bool]) -> tuple[list[int], list[int | None], list[int | None]]:
    """Packed positions whose logits are kept: the last token of each sequence that samples (a
    sequence in the middle of a chunked prefill does not), and every token of a chunk whose
    prompt log probabilities are wanted. -> (positions to keep, each sequence's sampling row or
    None, the row of each sequence's first token when all are kept, else None).

    >>> logit_rows([0, 3, 4, 9], [True, True, False], [False, False, False])
    ([2, 3], [0, 1, None], [None, None, None])
    >>> logit_rows([0, 3, 4], [True, True], [True, False])  # the first keeps its whole chunk
    ([0, 1, 2, 3], [2, 3], [0, None])
    """
    keep: list[int] = []
    last: list[int | None] = []
    first: list[int | None] = []
    for i, (wants, every) in enumerate(zip(wants_logits, all_logits, strict=True)):
        start, end = cu_lens[i], cu_lens[i + 1]
        first.append(len(keep) if every else None)
        if every:
            keep.extend(range(start, end))
        elif wants:
            keep.append(end - 1)
        last.append(len(keep) - 1 if wants else None)
    return keep, last, first


# Runs of one slot longer than this (prompt chunks) stay out of the padded block: padding every
# other slot to a prompt's length would multiply the work. They get a matmul pair each.
LONG_RUN = 8
# More empty slots than this between two of the step's slots split the padded block in two: a
# second bmm pair per layer then costs less than reading the gap's zero weights (estimated on
# CPU, not tuned: ~20 us of calls for the pair against ~5 us a rank-16 SmolLM2 slot).
SPLIT_GAP = 4


@dataclass(frozen=True)
class SlotGroups:
    """Where the packed tokens go for ops that batch over adapters (see `slot_groups`): the
    blocked tokens as a padded block [slots, width, features] over the slots of `ranges` in
    order (the tokens of the block's i-th slot are rows i * width + 0, 1, ...), and the long
    runs left out of it."""

    ranges: tuple[tuple[int, int], ...]  # the block's slots: lo..hi-1 of each (at most two)
    width: int  # rows per slot in the block
    token_rows: torch.Tensor | None  # [blocked] block row of each blocked token; None: in order
    blocked: torch.Tensor | None  # [blocked] their packed positions; None: every token
    num_blocked: int
    long_runs: tuple[tuple[int, int, int], ...]  # (start, end, slot) runs left out of the block

    @property
    def num_slots(self) -> int:
        return sum(hi - lo for lo, hi in self.ranges)

    @property
    def rows(self) -> int:
        return self.num_slots * self.width


def block_ranges(slots: Sequence[int], split_gap: int = SPLIT_GAP) -> tuple[tuple[int, int], ...]:
    """The slot ranges a padded block covers for these distinct sorted slots: one range, or two
    when the widest run of empty slots between them is longer than `split_gap`.

    >>> block_ranges([1, 2, 3])
    ((1, 4),)
    >>> block_ranges([1, 2, 30, 33])  # 27 empty slots between 2 and 30
    ((1, 3), (30, 34))
    >>> block_ranges([1, 4, 9])  # at most 4 empty slots anywhere: one range
    ((1, 10),)
    """
    gap, at = max(((b - a - 1, i) for i, (a, b) in enumerate(pairwise(slots))), default=(0, 0))
    if gap <= split_gap:
        return ((slots[0], slots[-1] + 1),)
    return ((slots[0], slots[at] + 1), (slots[at + 1], slots[-1] + 1))


def slot_groups(slots: Sequence[int], runs: Sequence[tuple[int, int, int]], device: torch.device,
                long_run: int = LONG_RUN, split_gap: int = SPLIT_GAP) -> SlotGroups:
    """Lay the packed tokens out as a padded block of the slots of `block_ranges`, `width` rows
    per slot (the most tokens any slot has), so one bmm per range serves every adapter instead
    of one matmul per adapter. Slots of a range without tokens get all-zero rows. Of `runs`
    (the step's `find_runs(slots)`), those longer than `long_run` tokens are left out
    (`long_runs`) for a matmul pair each. Index tensors are made on `device`.

    >>> def layout(slots, **kw):
    ...     g = slot_groups(slots, find_runs(slots), torch.device("cpu"), **kw)
    ...     return g.ranges, g.width, *(None if t is None else t.tolist() for t in (g.token_rows, g.blocked))
    >>> layout([1, 2, 3])  # a decode step on distinct slots: the tokens are the block, in order
    (((1, 4),), 1, None, None)
    >>> layout([0, 0, 2])  # slot 1 has no tokens: its rows stay zero
    (((0, 3),), 2, [0, 1, 4], None)
    >>> layout([1, 2, 2, 2, 3], long_run=2)  # a prompt chunk on slot 2 among decodes
    (((1, 4),), 1, [0, 2], [0, 4])
    >>> layout([1, 2, 20])  # slots 3..19 are left out of the block
    (((1, 3), (20, 21)), 1, None, None)
    """
    def as_tensor(index: list[int] | None) -> torch.Tensor | None:
        return None if index is None else torch.tensor(index, dtype=torch.long, device=device)

    long_runs = tuple(run for run in runs if run[1] - run[0] > long_run)
    in_long = {t for start, end, _ in long_runs for t in range(start, end)}
    blocked = [t for t in range(len(slots)) if t not in in_long]
    if not blocked:
        return SlotGroups((), 1, None, as_tensor([] if long_runs else None), 0, long_runs)
    blocked_slots = [slots[t] for t in blocked]
    counts: dict[int, int] = {}
    for s in blocked_slots:
        counts[s] = counts.get(s, 0) + 1
    width = max(counts.values())
    ranges = block_ranges(sorted(counts), split_gap)
    first_row = {}  # slot -> its first row in the block
    at = 0
    for lo, hi in ranges:
        first_row.update((s, (at + s - lo) * width) for s in counts if lo <= s < hi)
        at += hi - lo
    filled: dict[int, int] = {}
    rows = []
    for s in blocked_slots:
        rows.append(first_row[s] + filled.get(s, 0))
        filled[s] = filled.get(s, 0) + 1
    in_order = at * width == len(rows) and rows == list(range(len(rows)))
    return SlotGroups(ranges, width, None if in_order else as_tensor(rows),
                      as_tensor(blocked) if long_runs else None, len(blocked), long_runs)


class AttentionGroup(NamedTuple):
    """Sequences whose queries share one attention call: [N] sequences, padded to Q queries and
    L keys each. Decode tokens form one group (Q = 1), prompt chunks another (varlen)."""

    q_index: torch.Tensor  # [N, Q] packed position of each query (padding repeats the last one)
    kv_index: torch.Tensor  # [N, L] pool slot of each key (padding points anywhere, masked out)
    # [N, 1, Q, L] bool by sliding window (None: the whole causal context): key visible to query
    masks: dict[int | None, torch.Tensor]
    select: torch.Tensor | None  # [n_valid] rows of the flattened [N * Q] output that are real
    out_rows: torch.Tensor  # [n_valid] packed positions those rows belong to


def window_masks(causal: torch.Tensor, key_pos: torch.Tensor, query_pos: torch.Tensor,
                 windows: Sequence[int]) -> dict[int | None, torch.Tensor]:
    """The causal mask and, per sliding window w, the same mask limited to the last w keys of
    each query (transformers' rule: key position > query position - w). `key_pos` and
    `query_pos` broadcast to the mask's shape."""
    masks: dict[int | None, torch.Tensor] = {None: causal}
    for w in windows:
        masks[w] = causal & (key_pos > query_pos - w)
    return masks


def slot_index(tables: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Pool slot of token `positions[i, j]` of sequence i: tables [N, blocks], positions [N, P] -> [N, P].

    >>> slot_index(torch.tensor([[3, 1]]), torch.tensor([[0, 1, 2]]), 2).tolist()
    [[6, 7, 2]]
    """
    return tables.gather(1, positions // block_size) * block_size + positions % block_size


def attention_group(starts: Sequence[int], past_lens: Sequence[int], chunk_lens: Sequence[int],
                    tables: torch.Tensor, block_size: int, windows: Sequence[int] = ()) -> AttentionGroup:
    """One attention call over N sequences: where each sequence's chunk starts in the packed
    batch, its cached length, its chunk length ([N] each) and its block table [N, blocks] (on
    the model's device, where every tensor made here stays); a mask per sliding window in
    `windows` besides the causal one.

    >>> g = attention_group([0, 3], [0, 5], [3, 1], torch.tensor([[1], [2]]), 8, windows=[2])
    >>> g.q_index.tolist(), g.kv_index.tolist(), g.out_rows.tolist()
    ([[0, 1, 2], [3, 3, 3]], [[8, 9, 10, 0, 0, 0], [16, 17, 18, 19, 20, 21]], [0, 1, 2, 3])
    >>> g.masks[None][0, 0].int().tolist()  # a prompt chunk: causal
    [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]]
    >>> g.masks[None][1, 0, 0].int().tolist()  # a decode token after 5 cached ones (padded queries repeat it)
    [1, 1, 1, 1, 1, 1]
    >>> g.masks[2][1, 0, 0].int().tolist()  # ... under a window of 2: itself and the key before
    [0, 0, 0, 0, 1, 1]
    """
    device = tables.device
    q_max, kv_max = max(chunk_lens), max(p + c for p, c in zip(past_lens, chunk_lens, strict=True))
    start, past, chunk = (torch.tensor(list(v), dtype=torch.long, device=device)
                          for v in (starts, past_lens, chunk_lens))
    q = torch.arange(q_max, device=device)[None, :]  # [1, Q]
    q_clamped = torch.minimum(q, (chunk - 1)[:, None])  # [N, Q]: padding repeats the last query
    q_index = start[:, None] + q_clamped  # [N, Q]
    k = torch.arange(kv_max, device=device)[None, :]  # [1, L]
    # Keys past a sequence's context read pool slot 0 (the null block, all zeros): masked out,
    # and never uninitialised memory, which could hold NaN.
    kv_index = torch.where(k < (past + chunk)[:, None],
                           slot_index(tables, k.expand(len(starts), -1), block_size), 0)  # [N, L]
    # Query i of a sequence sits at position past + i and sees keys 0..past + i of its own cache.
    q_pos = (past[:, None] + q_clamped)[:, None, :, None]  # [N, 1, Q, 1]
    key_pos = k[:, None, None, :]  # [1, 1, 1, L]
    masks = window_masks(key_pos <= q_pos, key_pos, q_pos, windows)  # [N, 1, Q, L] each
    if q_max == 1:
        return AttentionGroup(q_index, kv_index, masks, None, q_index.view(-1))
    select = (q < chunk[:, None]).view(-1).nonzero().view(-1)  # [n_valid]
    return AttentionGroup(q_index, kv_index, masks, select, q_index.view(-1)[select])
