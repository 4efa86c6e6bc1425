"""Multi-adapter LoRA deltas behind one small interface.

Every op computes, for packed tokens x [T, in] and stacked per-slot weights
shrink [S, r, in] (PEFT's lora_A, scaling folded in) and expand [S, r, out] (lora_B
transposed; slot 0 all zeros):

    delta[t] = x[t] @ shrink[slot[t]].T @ expand[slot[t]]          # [T, out]

for tokens whose slot is in `slots`; the others get zeros (a slot is left out of
`slots` only when its buffers for this layer are zero anyway). In plain torch that
is the reference op below: PEFT's mixed-batch forward, one masked matmul pair per
adapter present. The faster ops must return the same values (up to float rounding);
tests compare them.

DoRA and LoRA biases are not part of the ops: after any op, the layer calls
`apply_bias_and_dora` (plain torch, gathers by slot index) on base output + delta. The static
ops of captured decode steps (`StaticLoRAOp`) take the base output and do all of it, always.

expand is stored transposed because the decode step's bmm runs about 20% faster with
a row-major right operand; for shrink the layout made no measurable difference.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Sequence
from typing import Protocol

import torch

from .batch_context import LoRABatch
from .batching import SlotGroups
from .config import LORA_OPS as LORA_OP_NAMES
from .triton_lora import available as triton_available
from .triton_lora import triton_lora, triton_lora_into


class LoRAOp(Protocol):
    def __call__(self, x: torch.Tensor, shrink: torch.Tensor, expand: torch.Tensor, batch: LoRABatch,
                 slots: Sequence[int], ranks: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, in], shrink [S, r, in], expand [S, r, out] -> delta [T, out]. `slots`: the step's
        non-zero slots that hold weights in this layer, sorted; tokens of other slots get zeros.
        `ranks` [S] (int32, on the device): each slot's rank here; an op may skip the zero rows
        past it (the Triton kernels do; the torch ops get buffers sliced to the step's largest)."""
        ...


class StaticLoRAOp(Protocol):
    def __call__(self, out: torch.Tensor, x: torch.Tensor, shrink: torch.Tensor, expand: torch.Tensor,
                 batch: LoRABatch, bias: torch.Tensor, dora_scale: torch.Tensor,
                 base_bias: torch.Tensor | None, ranks: torch.Tensor | None = None) -> torch.Tensor:
        """A captured step's LoRA work for one layer, over every slot: the base output out
        [T, out] plus each token's delta, then `apply_bias_and_dora` with the slot rows bias,
        dora_scale [S, out]; may write into `out` and return it. `ranks` [S] (int32, on the
        device: a captured graph reads the values of the moment) is each slot's rank in this
        layer; an op may skip the zero rows past it."""
        ...


def reference_lora(x: torch.Tensor, shrink: torch.Tensor, expand: torch.Tensor, batch: LoRABatch,
                   slots: Sequence[int], ranks: torch.Tensor | None = None) -> torch.Tensor:
    """Loop over adapters present; each takes its tokens by mask (PEFT `_mixed_batch_forward`)."""
    delta = x.new_zeros(x.shape[0], expand.shape[2])
    for s in slots:
        rows = batch.token_slots == s  # [T] bool
        delta[rows] = x[rows] @ shrink[s].T @ expand[s]
    return delta


def _run_delta(x: torch.Tensor, shrink: torch.Tensor, expand: torch.Tensor) -> torch.Tensor:
    """One adapter's delta for its tokens: x [n, in], shrink [r, in], expand [r, out] -> [n, out]."""
    return torch.mm(torch.mm(x, shrink.T), expand)


def segmented_lora(x: torch.Tensor, shrink: torch.Tensor, expand: torch.Tensor, batch: LoRABatch,
                   slots: Sequence[int], ranks: torch.Tensor | None = None) -> torch.Tensor:
    """One matmul pair per contiguous run of equal slots (tokens are packed slot by slot)."""
    wanted = set(slots)
    parts = []
    for start, end, s in batch.runs:
        if s in wanted:
            parts.append(_run_delta(x[start:end], shrink[s], expand[s]))
        else:
            parts.append(x.new_zeros(end - start, expand.shape[2]))
    return torch.cat(parts)


def _block_delta(x: torch.Tensor, shrink: torch.Tensor, expand: torch.Tensor, g: SlotGroups,
                 slots: Sequence[int]) -> torch.Tensor:
    """The blocked tokens' deltas: x [blocked, in] -> [blocked, out], through two bmm per range
    of the block (`g.ranges`) over the slots this layer serves (`slots`, sorted), each slot's
    weights read once, in place. Slots at either end of a range without weights here (their
    adapters do not target this layer) are left out of the bmm: their rows stay zero."""
    n = g.num_slots
    if g.token_rows is None:  # the tokens already are the block
        block = x.reshape(n, g.width, x.shape[1])
    else:
        block = x.new_zeros(g.rows, x.shape[1]).index_copy_(0, g.token_rows, x).view(n, g.width, -1)
    served = _served_parts(g.ranges, slots)
    if len(served) == 1 and served[0][2] - served[0][1] == n:  # the whole block
        _, lo, hi = served[0]
        y = torch.bmm(torch.bmm(block, shrink[lo:hi].transpose(1, 2)), expand[lo:hi])  # [n, width, out]
    else:
        y = x.new_zeros(n, g.width, expand.shape[2])
        for at, lo, hi in served:
            part = slice(at, at + hi - lo)
            torch.bmm(torch.bmm(block[part], shrink[lo:hi].transpose(1, 2)), expand[lo:hi], out=y[part])
    y = y.view(g.rows, -1)
    return y if g.token_rows is None else y.index_select(0, g.token_rows)


def _served_parts(ranges: Sequence[tuple[int, int]], slots: Sequence[int]) -> list[tuple[int, int, int]]:
    """Of each block range, the slots from the first to the last that hold weights in this layer
    (`slots`, sorted), as (its first slot's index in the block, lo, hi); ranges with none left out."""
    parts, at = [], 0
    for lo, hi in ranges:
        i, j = bisect_left(slots, lo), bisect_left(slots, hi)
        if i < j:
            parts.append((at + slots[i] - lo, slots[i], slots[j - 1] + 1))
        at += hi - lo
    return parts


def batched_lora(x: torch.Tensor, shrink: torch.Tensor, expand: torch.Tensor, batch: LoRABatch,
                 slots: Sequence[int], ranks: torch.Tensor | None = None) -> torch.Tensor:
    """Short runs of tokens (decode steps) go into one padded block [slots, width, in] for two
    bmm calls per layer instead of two matmuls per adapter, with no per-token weight copies;
    long runs (prompt chunks, `batch.groups.long_runs`) get a matmul pair each."""
    g = batch.groups
    if not slots:
        return x.new_zeros(x.shape[0], expand.shape[2])
    if not g.long_runs:
        return _block_delta(x, shrink, expand, g, slots)
    delta = x.new_zeros(x.shape[0], expand.shape[2])
    if g.num_blocked:
        delta.index_copy_(0, g.blocked, _block_delta(x.index_select(0, g.blocked), shrink, expand, g, slots))
    wanted = set(slots)
    for start, end, s in g.long_runs:
        if s in wanted:
            delta[start:end] = _run_delta(x[start:end], shrink[s], expand[s])
    return delta


def gathered_lora(x: torch.Tensor, shrink: torch.Tensor, expand: torch.Tensor, batch: LoRABatch,
                  slots: Sequence[int], ranks: torch.Tensor | None = None) -> torch.Tensor:
    """Each token's adapter weights gathered by its slot, then two bmm: shapes and launches are
    fixed by the token count alone, whatever the slots (a captured CUDA graph's op where Triton
    is missing). Copies [T, r, in + out] of weights per layer, so it is for small batches."""
    s = batch.token_slots
    h = torch.bmm(x[:, None, :], shrink.index_select(0, s).transpose(1, 2))  # [T, 1, r]
    return torch.bmm(h, expand.index_select(0, s))[:, 0]  # [T, out]


def auto_lora(x: torch.Tensor, shrink: torch.Tensor, expand: torch.Tensor, batch: LoRABatch,
              slots: Sequence[int], ranks: torch.Tensor | None = None) -> torch.Tensor:
    """Batched when its block holds several tokens and is at most half padding (decode tokens,
    also next to prompt chunks), else segmented (e.g. prompt chunks alone, or two adapters at
    opposite ends of the slot range). On SmolLM2 NF4, 32 decode sequences on 32 rank-16
    adapters, a step's LoRA ops took 74-104 ms batched against 142 ms for the leanest
    segmented loop (one thread; see docs/architecture.md)."""
    if _dense_block(batch.groups):
        return batched_lora(x, shrink, expand, batch, slots)
    return segmented_lora(x, shrink, expand, batch, slots)


def _dense_block(g: SlotGroups) -> bool:
    """The step's short runs fill a padded block that is several tokens and at most half padding."""
    return g.num_blocked > 1 and g.rows <= 2 * g.num_blocked


def cuda_auto_lora(x: torch.Tensor, shrink: torch.Tensor, expand: torch.Tensor, batch: LoRABatch,
                   slots: Sequence[int], ranks: torch.Tensor | None = None) -> torch.Tensor:
    """On CUDA: the two bmm of `batched_lora` for decode-only steps, the Triton kernels once a
    prompt chunk is in the step (or the block would be mostly padding). On an H200, 32 rank-16
    adapters, bf16, a layer's LoRA delta took 33-52 µs as bmm against 63-114 µs as Triton for
    32 decode tokens (both launch-bound; the bmm pair is cheaper to launch), and 63-82 µs as
    Triton against 226-277 µs as bmm + a matmul pair per chunk for 4 prompt chunks of 128 next
    to 28 decode tokens (benchmarks/results/gpu-lora-ops.json)."""
    g = batch.groups
    if not g.long_runs and _dense_block(g):
        return batched_lora(x, shrink, expand, batch, slots)
    return triton_lora(x, shrink, expand, batch, slots, ranks)


def apply_bias_and_dora(y: torch.Tensor, token_slots: torch.Tensor, bias: torch.Tensor | None,
                        dora_scale: torch.Tensor | None, base_bias: torch.Tensor | None) -> torch.Tensor:
    """The per-slot post-step shared by every op, PEFT's eval forward (dropout off) in one formula:

        z   = y + bias[slot[t]]                          # y [T, out]: base output + LoRA delta
        out = z + dora_scale[slot[t]] * (z - base_bias)

    bias [S, out] = scaling * lora_B.bias; dora_scale [S, out] = magnitude / ||W + scaling B A|| - 1
    per output row (PEFT's `mag_norm_scale - 1`); both zero for plain LoRA and slot 0, so those
    rows come out exactly as they went in (None: no slot in the step has one, skip it). For DoRA
    this equals PEFT's base + (m/n - 1) * (base - base_bias) + (m/n) * scaling * B A x."""
    z = y if bias is None else y + bias.index_select(0, token_slots).to(y.dtype)
    if dora_scale is None:
        return z
    z_base = z if base_bias is None else z - base_bias.to(y.dtype)
    return torch.addcmul(z, dora_scale.index_select(0, token_slots).to(y.dtype), z_base)


# The ops by name. The names are `config.LORA_OPS` (one list, torch-free, so EngineConfig and the
# CLI check lora_ops without torch); the op called NAME is the function NAME_lora of this module.
LORA_OPS: dict[str, LoRAOp] = {name: globals()[f"{name}_lora"] for name in LORA_OP_NAMES}


def gathered_static_lora(out: torch.Tensor, x: torch.Tensor, shrink: torch.Tensor, expand: torch.Tensor,
                         batch: LoRABatch, bias: torch.Tensor, dora_scale: torch.Tensor,
                         base_bias: torch.Tensor | None, ranks: torch.Tensor | None = None) -> torch.Tensor:
    """The static op in plain torch: `gathered_lora` (at full rank: a gather cannot skip rows
    per token), then the bias/DoRA rows."""
    delta = gathered_lora(x, shrink, expand, batch, ())
    return apply_bias_and_dora(out + delta.to(out.dtype), batch.token_slots, bias, dora_scale, base_bias)


def pick_static_op(device: torch.device) -> StaticLoRAOp:
    """The op of captured steps: on CUDA the Triton kernels over a run table of fixed size (the
    step's runs in 16-token pieces, `batch_context.static_lora_batch`), the rows applied as the
    expand kernel stores (`triton_lora_into`); else `gathered_static_lora`."""
    return triton_lora_into if device.type == "cuda" and triton_available() else gathered_static_lora


def uses_triton(op: LoRAOp | StaticLoRAOp) -> bool:
    """The op launches Triton kernels (in some steps or all)."""
    return op in (triton_lora, cuda_auto_lora, triton_lora_into)


def torch_twin(op: LoRAOp) -> LoRAOp:
    """The plain-torch op to serve with where `op`'s Triton kernels cannot run: `auto_lora`
    for the Triton-based ones, else `op` itself."""
    return auto_lora if uses_triton(op) else op


def pick_op(name: str, device: torch.device) -> LoRAOp:
    """The op called `name` for layers on `device`; "auto" means `cuda_auto_lora` on CUDA (when
    Triton is installed), else `auto_lora`."""
    if name == "auto" and device.type == "cuda" and triton_available():
        return cuda_auto_lora
    if name == "triton" and (not triton_available() or (
            device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1")):
        raise ValueError("lora_ops='triton' needs a CUDA device with Triton installed "
                         "(on CPU only under TRITON_INTERPRET=1, for tests)")
    return LORA_OPS[name]
