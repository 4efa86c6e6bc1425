"""The LoRA delta as two Triton kernels (CUDA): segmented matmuls over each run of tokens on
one adapter, shrink then expand, after Punica's SGMV.

One kernel serves both halves: for every run (start, length, slot) of the packed tokens,
`out[run] = x[run] @ W[slot]`, where W[slot] is a [K, N] view of a stacked weight buffer
(shrink [S, r, in] read as [in, r]; expand [S, r, out] as [r, out]) given by strides. A program
owns BLOCK_M tokens of one run and BLOCK_N output columns, so each adapter tile is read once
per block of tokens; slot 0 (no adapter) writes zeros. Tokens are packed slot by slot
(`batching.order_by_slot`), so runs are the step's segments.

The kernel lives in `triton_kernels.py`, imported on first use, so importing this module never
needs Triton. On CPU it runs only under Triton's interpreter (TRITON_INTERPRET=1 before that
import), which is how the tests check it against `lora_ops.reference_lora`, the executable spec.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .batch_context import LoRABatch

BLOCK_M, BLOCK_N, BLOCK_K = 16, 32, 32


def available() -> bool:
    """Triton is importable (CUDA wheels of torch ship it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def segmented_matmul(x: torch.Tensor, w: torch.Tensor, transposed: bool, runs: torch.Tensor,
                     longest_run: int) -> torch.Tensor:
    """x [T, K]; w [S, N, K] read as W[s] = w[s].T when `transposed`, else w [S, K, N];
    runs [G, 3] int (start, length, slot) covering every token -> out [T, N] (zeros on slot 0)."""
    import triton

    from .triton_kernels import segmented_matmul_kernel

    x = x.contiguous().to(w.dtype)
    n = w.shape[1] if transposed else w.shape[2]
    k = x.shape[1]
    out = x.new_empty(x.shape[0], n)
    stride_wk, stride_wn = (w.stride(2), w.stride(1)) if transposed else (w.stride(1), w.stride(2))
    grid = (runs.shape[0], triton.cdiv(longest_run, BLOCK_M), triton.cdiv(n, BLOCK_N))
    segmented_matmul_kernel[grid](x, w, out, runs, k, n, x.stride(0), w.stride(0), stride_wk, stride_wn, out.stride(0),
                    BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, EXACT_FP32=w.dtype == torch.float32)
    return out


def triton_lora(x: torch.Tensor, shrink: torch.Tensor, expand: torch.Tensor, batch: LoRABatch,
                slots: Sequence[int]) -> torch.Tensor:
    """The LoRA op (see lora_ops): shrink then expand, each one segmented-matmul launch. Slots
    outside `slots` are zero in this layer's buffers, so computing them changes nothing."""
    h = segmented_matmul(x, shrink, True, batch.runs, batch.longest_run)  # [T, r]
    return segmented_matmul(h, expand, False, batch.runs, batch.longest_run)  # [T, out]
