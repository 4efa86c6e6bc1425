"""The faster LoRA ops equal the reference op (PEFT mixed-batch semantics), and the wrapped layer
adds exactly the per-token delta of its slot."""

from __future__ import annotations

import pytest
import torch
from loradock.runtime import batching
from loradock.runtime.batch_context import (
    STATIC_RUN_PIECE,
    BatchContext,
    LoRABatch,
    static_lora_batch,
    use_context,
)
from loradock.runtime.lora_layer import MultiLoRALinear
from loradock.runtime.lora_ops import LORA_OPS, reference_lora
from loradock.runtime.model_runner import lora_batch
from torch import nn


def make_batch(seq_slots: list[int], chunk_lens: list[int], device: torch.device | None = None) -> LoRABatch:
    return lora_batch(batching.token_slots(seq_slots, chunk_lens), device or torch.device("cpu"))


def static_batch(batch: LoRABatch) -> LoRABatch:
    """`batch` as a captured step sees it: its runs in pieces of 16 tokens in a larger table (two
    unused rows), no slot bookkeeping."""
    pieces = batching.run_pieces(batching.find_runs(batch.token_slots.tolist()), STATIC_RUN_PIECE)
    table = torch.tensor([*pieces, (0, 0, 0), (0, 0, 0)], device=batch.token_slots.device)
    return static_lora_batch(batch.token_slots, table)


def stacked_weights(num_slots: int, ranks: list[int], r_max: int, d_in: int, d_out: int, seed: int):
    """shrink [S, r_max, in], expand [S, r_max, out] with slot s using ranks[s] (zero-padded), slot 0 zero."""
    g = torch.Generator().manual_seed(seed)
    shrink = torch.zeros(num_slots, r_max, d_in)
    expand = torch.zeros(num_slots, r_max, d_out)
    for s, r in enumerate(ranks, start=1):
        shrink[s, :r] = torch.randn(r, d_in, generator=g)
        expand[s, :r] = torch.randn(r, d_out, generator=g)
    return shrink, expand


CASES = [
    # (seq_slots, chunk_lens): decode-only, prefill, mixed, base-only tokens, repeated slots apart
    ([1, 2, 3, 4], [1, 1, 1, 1]),
    ([0, 1, 1, 2], [5, 3, 1, 7]),
    ([2, 0, 2, 3, 1], [1, 4, 1, 1, 9]),
    ([0, 0], [3, 1]),
    ([4], [17]),
    ([1, 2, 3, 4], [2, 2, 2, 2]),  # the packed tokens are the padded block itself
    ([1, 3], [1, 1]),  # a slot of the range without tokens
    ([1, 2, 3, 0], [1, 12, 1, 9]),  # prompt chunks (long runs) among decode tokens
    ([2, 2, 1], [1, 10, 1]),  # a decode token and a prompt chunk on one slot: one long run
    ([3, 3, 1], [1, 1, 1]),  # two sequences on one slot, not adjacent
    ([1, 2, 12, 13], [1, 1, 1, 1]),  # slots far apart: the padded block has two ranges
    ([12, 1, 2, 12], [1, 1, 12, 1]),  # two ranges, a prompt chunk, a slot twice
]


def case_weights(seq_slots: list[int], d_in: int, d_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked weights for a CASES entry: ranks 4, 8, 16, 2 in turn over every slot it uses."""
    num_slots = max(5, max(seq_slots) + 1)
    ranks = [(4, 8, 16, 2)[i % 4] for i in range(num_slots - 1)]
    return stacked_weights(num_slots, ranks, 16, d_in, d_out, seed=len(seq_slots))


@pytest.mark.parametrize("op_name", ["segmented", "batched", "auto", "gathered"])
@pytest.mark.parametrize(("seq_slots", "chunk_lens"), CASES)
@pytest.mark.parametrize(("d_in", "d_out"), [(16, 24), (64, 8)])
def test_fast_ops_match_reference(op_name, seq_slots, chunk_lens, d_in, d_out):
    shrink, expand = case_weights(seq_slots, d_in, d_out)
    batch = make_batch(seq_slots, chunk_lens)
    x = torch.randn(sum(chunk_lens), d_in, generator=torch.Generator().manual_seed(1))
    want = reference_lora(x, shrink, expand, batch, batch.slots_present)
    got = LORA_OPS[op_name](x, shrink, expand, batch, batch.slots_present)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Layers that only some adapters target (the others' buffers there are zero, and they are
    # not in `slots`): the first, the last, the inner ones; the batched op trims the block's ends.
    present = batch.slots_present
    for only in {present[:1], present[-1:], present[1:-1]} - {()}:
        targeted = torch.zeros(shrink.shape[0], 1, 1)
        targeted[list(only)] = 1
        want = reference_lora(x, shrink * targeted, expand * targeted, batch, only)
        got = LORA_OPS[op_name](x, shrink * targeted, expand * targeted, batch, only)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"layer targeted by slots {only}")


def test_reference_is_plain_per_token_math():
    shrink, expand = stacked_weights(3, [3, 5], 8, 6, 4, seed=0)
    batch = make_batch([2, 0, 1], [2, 1, 2])
    x = torch.randn(5, 6)
    delta = reference_lora(x, shrink, expand, batch, batch.slots_present)
    for t, s in enumerate(batch.token_slots.tolist()):
        torch.testing.assert_close(delta[t], expand[s].T @ (shrink[s] @ x[t]))
    assert torch.all(delta[2] == 0), "slot 0 tokens get no delta"


@pytest.mark.parametrize("slice_ranks", [True, False])  # False: as on CUDA, full-rank operands
@pytest.mark.parametrize("op_name", ["reference", "segmented", "batched"])
def test_layer_adds_scaled_delta_per_slot(op_name, slice_ranks):
    base = nn.Linear(12, 10)
    layer = MultiLoRALinear(base, num_slots=4, max_rank=8, dtype=torch.float32, device=torch.device("cpu"),
                            op=LORA_OPS[op_name])
    layer.slice_ranks = slice_ranks
    g = torch.Generator().manual_seed(0)
    A1, B1 = torch.randn(4, 12, generator=g), torch.randn(10, 4, generator=g)
    A3, B3 = torch.randn(8, 12, generator=g), torch.randn(10, 8, generator=g)
    layer.set_slot(1, 2.0 * A1, B1.T)
    layer.set_slot(3, 0.5 * A3, B3.T)
    x = torch.randn(1, 6, 12, generator=g)
    batch = make_batch([1, 0, 3], [2, 1, 3])
    with use_context(BatchContext(lora=batch)):
        y = layer(x)[0]
    plain = base(x)[0]
    torch.testing.assert_close(y[:2], plain[:2] + 2.0 * (x[0, :2] @ A1.T @ B1.T))
    torch.testing.assert_close(y[2], plain[2])
    torch.testing.assert_close(y[3:], plain[3:] + 0.5 * (x[0, 3:] @ A3.T @ B3.T))
    torch.testing.assert_close(layer(x), base(x))  # outside a batch context: the base layer alone
    with use_context(BatchContext(lora=make_batch([1, 0], [4, 2]))):  # only rank 4 present: sliced maths
        y = layer(x)[0]
    torch.testing.assert_close(y[:4], plain[:4] + 2.0 * (x[0, :4] @ A1.T @ B1.T))
    torch.testing.assert_close(y[4:], plain[4:])

    layer.set_slot(3, None, None)  # evicted: buffers zero, slot inactive
    assert layer.ranks[3] == 0 and layer.lora_shrink[3].abs().sum() == 0 and layer.lora_expand[3].abs().sum() == 0
    layer.set_slot(3, 0.5 * A3, B3.T)
    layer.set_slot(3, 2.0 * A1, B1.T)  # rank 4 over rank 8: the larger adapter's rows 4..7 go
    assert layer.lora_shrink[3, 4:].abs().sum() == 0 == layer.lora_expand[3, 4:].abs().sum()
    with use_context(BatchContext(lora=make_batch([3], [6]))):
        torch.testing.assert_close(layer(x)[0], plain + 2.0 * (x[0] @ A1.T @ B1.T))
    layer.set_slot(3, None, None)
    assert layer.lora_shrink[3].abs().sum() == 0 == layer.lora_expand[3].abs().sum()
    with pytest.raises(ValueError, match="reserved"):
        layer.set_slot(0, A1, B1.T)
    with pytest.raises(ValueError, match="do not fit"):
        layer.set_slot(2, A1[:, :5], B1.T)


def test_warm_up_runs_each_layer_shape_once():
    """The engine's start runs every distinct layer shape's op once on a prompt chunk, so Triton
    compiles its kernels there and not in a request's first step."""
    from loradock.runtime.lora_layer import warm_up_ops

    calls = []

    def op(x, shrink, expand, batch, slots, ranks):
        assert ranks.dtype == torch.int32 and ranks.shape == (3,)  # the layer's slot ranks, for the kernels
        calls.append((tuple(x.shape), tuple(expand.shape), slots))
        return reference_lora(x, shrink, expand, batch, slots)

    layers = [MultiLoRALinear(nn.Linear(i, o), 3, 4, torch.float32, torch.device("cpu"), op)
              for i, o in [(8, 6), (8, 6), (6, 8), (8, 6)]]
    warm_up_ops(layers, make_batch([1], [17]))
    assert calls == [((17, 8), (3, 4, 6), (1,)), ((17, 6), (3, 4, 8), (1,))]

    static_calls = []  # a static batch: the static op (that of captured steps), once per shape too

    def static_op(out, x, shrink, expand, batch, bias, dora_scale, base_bias, ranks):
        static_calls.append((tuple(out.shape), tuple(x.shape)))
        return out

    for layer in layers:
        layer.static_op = static_op
    warm_up_ops(layers, static_batch(make_batch([0], [1])))
    assert static_calls == [((1, 6), (1, 8)), ((1, 8), (1, 6))] and len(calls) == 2
