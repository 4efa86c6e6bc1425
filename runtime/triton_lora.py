"""The LoRA delta as two Triton kernels (CUDA): segmented matmuls over each run of tokens on
one adapter, shrink then expand, after Punica's SGMV.

One kernel serves both halves: for every run (start, length, slot) of the packed tokens,
`out[run] = x[run] @ W[slot]`, where W[slot] is a [K, N] view of a stacked weight buffer
(shrink [S, r, in] read as [in, r]; expand [S, r, out] as [r, out]) given by strides. A program
owns BLOCK_M tokens of one run and BLOCK_N output columns, so each adapter tile is read once
per block of tokens; slot 0 (no adapter) writes zeros. Tokens are packed slot by slot
(`batching.order_by_slot`), so each adapter's tokens form one run (`batching.find_runs`).

The kernel lives in `triton_kernels.py`, imported on first use, so importing this module never
needs Triton. On CPU it runs only under Triton's interpreter (TRITON_INTERPRET=1 before that
import), which is how the tests check it against `lora_ops.reference_lora`, the executable spec.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .batch_context import STATIC_RUN_PIECE, LoRABatch

BLOCK_M, BLOCK_N, BLOCK_K = STATIC_RUN_PIECE, 32, 32  # BLOCK_M: one program per row of a static run table
# Split-K shrinks: runs this short leave few programs, each looping over all of K (4,096 to 14,336
# inputs at 8B); such a shrink splits K into chunks of at least MIN_SPLIT_K, at most MAX_SPLITS.
SPLIT_K_MAX_RUN, MIN_SPLIT_K, MAX_SPLITS = 64, 512, 16


def available() -> bool:
    """Triton is importable (CUDA wheels of torch ship it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def shrink_splits(k: int, longest_run: int) -> int:
    """How many chunks a shrink over K inputs splits K into (split-K): a step of short runs
    (decode tokens, a captured step's 16-token pieces) gives few programs, each looping over all
    of K; split, each sums a chunk of at least MIN_SPLIT_K. Long runs have programs enough.

    >>> shrink_splits(4096, 16), shrink_splits(14336, 1), shrink_splits(576, 16), shrink_splits(4096, 512)
    (8, 16, 1, 1)
    """
    return 1 if longest_run > SPLIT_K_MAX_RUN else max(1, min(MAX_SPLITS, k // MIN_SPLIT_K))


def _split_chunk(k: int, splits: int) -> int:
    """K per split, whole BLOCK_K tiles."""
    tiles = -(-k // BLOCK_K)
    return -(-tiles // splits) * BLOCK_K


def segmented_matmul(x: torch.Tensor, w: torch.Tensor, transposed: bool, runs: torch.Tensor, longest_run: int,
                     out: torch.Tensor | None = None,
                     slot_rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
                     ranks: torch.Tensor | None = None, splits: int = 1) -> torch.Tensor:
    """x [T, K] (or [P, T, K]: P partial sums of it, added up as read); w [S, N, K] read as
    W[s] = w[s].T when `transposed`, else w [S, K, N]; runs [G, 3] int (start, length, slot)
    covering every token -> a new [T, N] (zeros on slot 0), or with `splits` > 1 a new
    [splits, T, N] float32 of partial sums over chunks of K (split-K), whose sum is the answer.
    With `out` [T, N] (rows contiguous): added into it instead, and with `slot_rows` = (bias,
    dora_scale [S, N], base_bias [N] or None) the LoRA bias and DoRA rows applied in the same
    pass (see `lora_ops.apply_bias_and_dora`); returns `out`. With `ranks` [S] (int32, each
    slot's rank; w's rank rows past it are zero), only a slot's own rank of w is read: N when
    `transposed` (shrink), else K (expand)."""
    import triton

    from .triton_kernels import segmented_matmul_kernel

    x = x.contiguous() if x.dim() == 3 else x.contiguous().to(w.dtype)  # partial sums stay float32
    partials = x if x.dim() == 3 else x[None]
    n = w.shape[1] if transposed else w.shape[2]
    tokens, k = partials.shape[1:]
    add_to_out = out is not None
    if add_to_out and splits > 1:
        raise ValueError("split-K writes partial sums: it cannot add into out")
    if out is None:
        out = (x.new_empty(tokens, n, dtype=w.dtype) if splits == 1
               else x.new_empty(splits, tokens, n, dtype=torch.float32))
    elif out.shape != (tokens, n) or out.stride(1) != 1:
        raise ValueError(f"out must be [{tokens}, {n}] with contiguous rows, not {tuple(out.shape)} "
                         f"strides {out.stride()}")
    bias, dora_scale, base_bias = slot_rows if slot_rows is not None else (out, out, None)
    if slot_rows is not None and (bias.stride() != dora_scale.stride() or bias.stride(1) != 1):
        raise ValueError("the bias and DoRA rows must share one contiguous row layout")
    stride_wk, stride_wn = (w.stride(2), w.stride(1)) if transposed else (w.stride(1), w.stride(2))
    grid = (runs.shape[0], triton.cdiv(longest_run, BLOCK_M) * splits, triton.cdiv(n, BLOCK_N))
    segmented_matmul_kernel[grid](
        partials, w, out, runs, bias, dora_scale, out if base_bias is None else base_bias,
        runs if ranks is None else ranks, k, n, _split_chunk(k, splits),
        partials.stride(1), partials.stride(0), w.stride(0), stride_wk, stride_wn, out.stride(-2),
        out.stride(0) if splits > 1 else 0, bias.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, EXACT_FP32=w.dtype == torch.float32,
        ADD_TO_OUT=add_to_out, SLOT_ROWS=slot_rows is not None, BASE_BIAS=base_bias is not None,
        RANK_DIM=0 if ranks is None else 1 if transposed else 2, SPLIT_K=splits, X_SPLITS=partials.shape[0])
    return out


def triton_lora(x: torch.Tensor, shrink: torch.Tensor, expand: torch.Tensor, batch: LoRABatch,
                slots: Sequence[int], ranks: torch.Tensor | None = None) -> torch.Tensor:
    """The LoRA op (see lora_ops): shrink then expand, each one segmented-matmul launch, each
    run read to its slot's rank when `ranks` is given. Slots outside `slots` are zero in this
    layer's buffers, so computing them changes nothing."""
    h = segmented_matmul(x, shrink, True, batch.run_table, batch.longest_run, ranks=ranks,
                         splits=shrink_splits(x.shape[1], batch.longest_run))  # [T, r] or its partials
    return segmented_matmul(h, expand, False, batch.run_table, batch.longest_run, ranks=ranks)  # [T, out]


def triton_lora_into(out: torch.Tensor, x: torch.Tensor, shrink: torch.Tensor, expand: torch.Tensor,
                     batch: LoRABatch, bias: torch.Tensor, dora_scale: torch.Tensor,
                     base_bias: torch.Tensor | None, ranks: torch.Tensor | None = None) -> torch.Tensor:
    """A static op (see lora_ops): the whole LoRA work of a layer in two launches, written into
    the base output `out` [T, out]: the shrink kernel, then the expand kernel adding the delta,
    LoRA bias and DoRA rows as it stores (a captured decode step would otherwise launch five
    more kernels per layer for the add and the rows). With the slots' `ranks`, each token's
    kernels read its adapter's rank of the buffers, not the max rank they are padded to."""
    h = segmented_matmul(x, shrink, True, batch.run_table, batch.longest_run, ranks=ranks,
                         splits=shrink_splits(x.shape[1], batch.longest_run))  # [T, r] or its partials
    return triton_expand_into(out, h, expand, batch, bias, dora_scale, base_bias, ranks)


def triton_expand_into(out: torch.Tensor, h: torch.Tensor, expand: torch.Tensor, batch: LoRABatch,
                       bias: torch.Tensor, dora_scale: torch.Tensor, base_bias: torch.Tensor | None,
                       ranks: torch.Tensor | None = None) -> torch.Tensor:
    """`triton_lora_into`'s second launch, from the shrink's output h [T, r] (or its partial sums)."""
    return segmented_matmul(h, expand, False, batch.run_table, batch.longest_run, out=out,
                            slot_rows=(bias, dora_scale, base_bias), ranks=ranks)


def grouped_shrink(x: torch.Tensor, shrinks: Sequence[torch.Tensor], batch: LoRABatch,
                   ranks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The shrinks of up to three layers that read the same x [T, K] (each [S, r, K], one layout),
    in one launch: [x @ shrink_j[slot].T for each j], each [T, r] (split-K: [splits, T, r]
    partial sums, as `segmented_matmul`), each slot read to its rank `ranks[j]`. A captured
    step's attention then makes one shrink launch for q, k and v."""
    import triton

    from .triton_kernels import grouped_shrink_kernel

    if not 1 <= len(shrinks) <= 3 or len({(w.shape, w.stride(), w.dtype) for w in shrinks}) != 1:
        raise ValueError("grouped_shrink takes 1 to 3 shrink buffers of one shape, layout and dtype")
    w = shrinks[0]
    x = x.contiguous().to(w.dtype)
    n = w.shape[1]
    splits = shrink_splits(x.shape[1], batch.longest_run)
    outs = [x.new_empty(x.shape[0], n) if splits == 1 else x.new_empty(splits, x.shape[0], n, dtype=torch.float32)
            for _ in shrinks]

    def three(items: Sequence[torch.Tensor]) -> list[torch.Tensor]:  # unused members point at the first
        return [*items, *[items[0]] * (3 - len(items))]

    col_blocks = triton.cdiv(n, BLOCK_N)
    grid = (batch.run_table.shape[0], triton.cdiv(batch.longest_run, BLOCK_M) * splits, len(shrinks) * col_blocks)
    grouped_shrink_kernel[grid](
        x, *three(shrinks), *three(outs), batch.run_table, *three(ranks), x.shape[1], n,
        _split_chunk(x.shape[1], splits), x.stride(0), w.stride(0), w.stride(2), w.stride(1), outs[0].stride(-2),
        outs[0].stride(0) if splits > 1 else 0,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, EXACT_FP32=w.dtype == torch.float32,
        COL_BLOCKS=col_blocks, SPLIT_K=splits)
    return outs
