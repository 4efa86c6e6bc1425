"""The persistent inputs of static steps (cuda_graphs.py), filled on the host: every token row
in its place, each sequence's row for the kernel, and padding rows that belong to a sequence row
the kernel writes (none of the model runs here; the oracle tests run the forwards)."""

from __future__ import annotations

import pytest
import torch
from loradock.runtime.cuda_graphs import StaticStep, StepGraphs
from loradock.runtime.kv_cache import KVPool
from loradock.runtime.model_runner import StepItem

CPU = torch.device("cpu")


def pool() -> KVPool:
    return KVPool(num_layers=1, kv_heads=1, head_dim=4, num_blocks=8, block_size=4, dtype=torch.float32,
                  device=CPU)


def filled(step: StaticStep, items) -> tuple[torch.Tensor, ...]:
    step.fill(items, 4)
    seqs, tables = step._paged_views(step.meta)
    return step.tokens, step.positions, step.slots, step.write_index, step.keep, seqs, tables


def run_table(step: StaticStep) -> list[list[int]]:
    """The LoRA kernels' runs (start, length, slot) of the filled step, the unused rows left out."""
    assert step.ctx.lora.run_table.data_ptr() == step._step_views(step.meta)[1].data_ptr()  # what the layers read
    return [row for row in step.ctx.lora.run_table.tolist() if row[1]]


def test_a_mixed_step_places_each_row_and_pads_into_spare_sequence_rows():
    step = StaticStep(lambda **_: None, pool(), CPU, rows=16, context=16, paged=True, seqs=5)
    items = [StepItem([3], 2, [7], 2, True),  # a decode token after 2 cached
             StepItem([1, 5], 0, [4, 5, 6, 8, 9], 1, False)]  # a prompt chunk that samples nothing
    tokens, positions, slots, write, keep, seqs, tables = filled(step, items)
    assert tokens[:6].tolist() == [7, 4, 5, 6, 8, 9] and tokens[6:].eq(0).all()
    assert positions[:6].tolist() == [2, 0, 1, 2, 3, 4] and positions[6:].eq(0).all()
    assert slots[:6].tolist() == [2, 1, 1, 1, 1, 1] and slots[6:].eq(0).all()
    assert write[:6].tolist() == [14, 4, 5, 6, 7, 20] and write[6:].eq(0).all()  # block * 4 + offset
    assert keep[:2].tolist() == [0, 5]
    assert seqs[:2].tolist() == [[0, 1, 2], [1, 5, 0]]
    assert tables[:2, :2].tolist() == [[3, 0], [1, 5]] and tables[2:].eq(0).all()  # padding: the null block
    # Rows 6..15 are padding: spread over the three spare sequence rows, every row covered once.
    assert seqs[2:].tolist() == [[6, 1, 0], [7, 1, 0], [8, 8, 0]]
    covered = sorted(r for start, new, _ in seqs.tolist() for r in range(start, start + new))
    assert covered == list(range(16))
    assert run_table(step) == [[0, 1, 2], [1, 5, 1]]  # the padding rows are slot 0: no run needed
    # The next step's fill leaves nothing of this one behind.
    _, _, _, _, keep, seqs, _ = filled(step, [StepItem([2], 0, [1, 2], 0, True)])
    assert keep[:1].tolist() == [1] and seqs.tolist() == [[0, 2, 0], [2, 1, 0], [3, 1, 0], [4, 1, 0], [5, 11, 0]]


def test_the_lora_runs_of_a_static_step_are_cut_into_pieces_of_16_tokens():
    step = StaticStep(lambda **_: None, pool(), CPU, rows=64, context=64, paged=True, seqs=5)
    assert step.runs == 4 + 5
    items = [StepItem([1], 2, [7], 0, True), StepItem([2], 2, [7], 3, True),
             StepItem([3] * 9, 0, [4] * 20, 3, True), StepItem([4] * 9, 0, [4] * 33, 5, False)]
    filled(step, items)
    assert run_table(step) == [[0, 1, 0], [1, 16, 3], [17, 5, 3], [22, 16, 5], [38, 16, 5], [54, 1, 5]]
    filled(step, items[:1])
    assert run_table(step) == [[0, 1, 0]]  # nothing left of the step before


def test_a_mixed_step_needs_the_paged_kernel():
    with pytest.raises(ValueError, match="paged attention kernel"):
        StaticStep(lambda **_: None, pool(), CPU, rows=16, context=16, seqs=5)


def test_which_steps_the_static_path_serves():
    graphs = StepGraphs(torch.nn.Identity(), pool(), CPU, max_batch=4, max_context=32, capture=False, paged=True,
                        max_tokens=48)
    assert graphs.batch_buckets == [1, 2, 4] and graphs.token_buckets == [16, 32]  # capped by the context
    decode = [StepItem([1], 3, [5], 1, True)] * 3
    chunk = StepItem([1, 2], 0, [5] * 8, 1, True)
    assert graphs.serves(decode) and graphs.serves([*decode, chunk])
    assert not graphs.serves([*decode, chunk, chunk])  # more sequences than max_batch
    assert not graphs.serves([StepItem([1, 2, 3, 4, 5], 0, [5] * 33, 1, True)])  # past the largest token bucket
    assert not graphs.serves([StepItem([1, 2], 0, [5] * 8, 1, True, all_logits=True)])  # prompt log probabilities
    assert not graphs.serves([StepItem([1] * 9, 30, [5] * 3, 1, True)])  # past the context
    graphs.mixed_failed = "capture failed"
    assert graphs.serves(decode) and not graphs.serves([*decode, chunk])
    sdpa = StepGraphs(torch.nn.Identity(), pool(), CPU, max_batch=4, max_context=32, capture=False, max_tokens=48)
    assert sdpa.token_buckets == [] and sdpa.serves(decode) and not sdpa.serves([chunk])
