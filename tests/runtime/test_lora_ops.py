"""The faster LoRA ops equal the reference op (PEFT mixed-batch semantics), and the wrapped layer
adds exactly the per-token delta of its slot."""

from __future__ import annotations

import pytest
import torch
from loradock.runtime import batching
from loradock.runtime.batch_context import BatchContext, LoRABatch, use_context
from loradock.runtime.lora_layer import MultiLoRALinear
from loradock.runtime.lora_ops import LORA_OPS, reference_lora
from torch import nn


def make_batch(seq_slots: list[int], chunk_lens: list[int]) -> LoRABatch:
    token_slots = batching.token_slots(seq_slots, chunk_lens)
    slot_list = token_slots.tolist()
    return LoRABatch(
        token_slots=token_slots,
        segments=tuple(batching.find_segments(slot_list)),
        slots_present=tuple(sorted({s for s in slot_list if s})),
        decode_only=all(n == 1 for n in chunk_lens),
    )


def stacked_weights(num_slots: int, ranks: list[int], r_max: int, d_in: int, d_out: int, seed: int):
    """A [S, r_max, in], B [S, out, r_max] with slot s using ranks[s] (zero-padded), slot 0 zero."""
    g = torch.Generator().manual_seed(seed)
    A = torch.zeros(num_slots, r_max, d_in)
    B = torch.zeros(num_slots, d_out, r_max)
    for s, r in enumerate(ranks, start=1):
        A[s, :r] = torch.randn(r, d_in, generator=g)
        B[s, :, :r] = torch.randn(d_out, r, generator=g)
    return A, B


CASES = [
    # (seq_slots, chunk_lens): decode-only, prefill, mixed, base-only tokens, repeated slots apart
    ([1, 2, 3, 4], [1, 1, 1, 1]),
    ([0, 1, 1, 2], [5, 3, 1, 7]),
    ([2, 0, 2, 3, 1], [1, 4, 1, 1, 9]),
    ([0, 0], [3, 1]),
    ([4], [17]),
]


@pytest.mark.parametrize("op_name", ["segmented", "gathered", "auto"])
@pytest.mark.parametrize(("seq_slots", "chunk_lens"), CASES)
@pytest.mark.parametrize(("d_in", "d_out"), [(16, 24), (64, 8)])
def test_fast_ops_match_reference(op_name, seq_slots, chunk_lens, d_in, d_out):
    A, B = stacked_weights(5, [4, 8, 16, 2], 16, d_in, d_out, seed=len(seq_slots))
    batch = make_batch(seq_slots, chunk_lens)
    x = torch.randn(sum(chunk_lens), d_in, generator=torch.Generator().manual_seed(1))
    for slots in (batch.slots_present, batch.slots_present[:1]):  # all adapters, or only one targets
        want = reference_lora(x, A, B, batch, slots)
        got = LORA_OPS[op_name](x, A, B, batch, slots)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_reference_is_plain_per_token_math():
    A, B = stacked_weights(3, [3, 5], 8, 6, 4, seed=0)
    batch = make_batch([2, 0, 1], [2, 1, 2])
    x = torch.randn(5, 6)
    delta = reference_lora(x, A, B, batch, batch.slots_present)
    for t, s in enumerate(batch.token_slots.tolist()):
        torch.testing.assert_close(delta[t], B[s] @ (A[s] @ x[t]))
    assert torch.all(delta[2] == 0), "slot 0 tokens get no delta"


@pytest.mark.parametrize("op_name", ["reference", "segmented", "gathered"])
def test_layer_adds_scaled_delta_per_slot(op_name):
    base = nn.Linear(12, 10)
    layer = MultiLoRALinear(base, num_slots=4, max_rank=8, dtype=torch.float32, device=torch.device("cpu"),
                            op=LORA_OPS[op_name])
    g = torch.Generator().manual_seed(0)
    A1, B1 = torch.randn(4, 12, generator=g), torch.randn(10, 4, generator=g)
    A3, B3 = torch.randn(8, 12, generator=g), torch.randn(10, 8, generator=g)
    layer.set_slot(1, A1, B1, scaling=2.0)
    layer.set_slot(3, A3, B3, scaling=0.5)
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

    layer.set_slot(3, None, None, 0.0)  # evicted: buffers zero, slot inactive
    assert layer.ranks[3] == 0 and layer.lora_A[3].abs().sum() == 0 and layer.lora_B[3].abs().sum() == 0
    with pytest.raises(ValueError, match="reserved"):
        layer.set_slot(0, A1, B1, 1.0)
    with pytest.raises(ValueError, match="do not fit"):
        layer.set_slot(2, A1[:, :5], B1, 1.0)
