"""Paged attention as one Triton kernel per layer that reads the KV pool through block tables.

The SDPA backend (`attention.py`) gathers every sequence's keys into a padded copy and builds a
boolean mask per call; this one hands the kernel each sequence's block table and lengths
(`PagedSeqs`, made once per step) and the kernel reads the pool in place: decode tokens and
prompt chunks of any length in one launch, grouped-query heads sharing one pass over the keys,
sliding windows skipping the keys they cannot see, Gemma 2's soft-capping. Its shapes depend only
on the number of sequences (the block table has a fixed width), so a captured decode step needs
no context buckets.

`reference_paged_attention` is the executable spec (plain torch, one sequence at a time); the
tests check the kernel against it under Triton's CPU interpreter, and the engine checks it once
at start on its device before trusting it. The kernel lives in `paged_attention_kernel.py`,
imported on first use, so importing this module never needs Triton.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

BLOCK_N = 64  # keys per tile
ROWS_DECODE, ROWS_PREFILL = 16, 64  # (token, head) rows per program: tl.dot needs at least 16


@dataclass(frozen=True)
class PagedSeqs:
    """What the kernel needs to know about a step's sequences, on the model's device."""

    tables: torch.Tensor  # [N, blocks] int32: each sequence's block table, zero-padded
    seqs: torch.Tensor  # [N, 3] int32: first packed row, new tokens, cached tokens
    max_new: int  # most new tokens of any sequence (1 for a decode-only step): sets the grid
    block_size: int


def paged_seqs(starts: Sequence[int], cached: Sequence[int], new: Sequence[int], tables: torch.Tensor,
               block_size: int) -> PagedSeqs:
    """The kernel's view of N sequences: where each one's new tokens start in the packed batch,
    its cached length, its new tokens ([N] each) and its block tables [N, blocks].

    >>> p = paged_seqs([0, 3], [0, 5], [3, 1], torch.tensor([[1, 0], [2, 4]]), 16)
    >>> p.seqs.tolist(), p.max_new, p.tables.dtype
    ([[0, 3, 0], [3, 1, 5]], 3, torch.int32)
    """
    seqs = torch.tensor([list(row) for row in zip(starts, new, cached, strict=True)], dtype=torch.int32)
    return PagedSeqs(tables.to(torch.int32), seqs.to(tables.device), max(new), block_size)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (Triton's block shapes are powers of two).

    >>> [next_power_of_2(n) for n in (1, 3, 4, 9)]
    [1, 4, 4, 16]
    """
    return 1 << (n - 1).bit_length()


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, batch: PagedSeqs,
                    scale: float | None = None, window: int | None = None,
                    softcap: float | None = None) -> torch.Tensor:
    """q [T, heads, d] (the step's packed queries; any strides but the last) and one layer's pool
    k_pool/v_pool [slots, kv_heads, d] -> the attention output [T, heads, d] (rows of no sequence
    are left unwritten)."""
    import triton

    from .paged_attention_kernel import paged_attention_kernel

    tokens, heads, head_dim = q.shape
    kv_heads = k_pool.shape[1]
    if heads % kv_heads or q.stride(2) != 1 or k_pool.stride() != v_pool.stride() or k_pool.stride(2) != 1:
        raise ValueError(f"paged attention needs heads ({heads}) a multiple of kv heads ({kv_heads}) and "
                         "contiguous head dimensions")
    group = heads // kv_heads
    group_pad = next_power_of_2(group)
    block_q = max(1, (ROWS_DECODE if batch.max_new == 1 else ROWS_PREFILL) // group_pad)
    out = q.new_empty(tokens, heads, head_dim)
    grid = (batch.seqs.shape[0], kv_heads, triton.cdiv(batch.max_new, block_q))
    paged_attention_kernel[grid](
        q, k_pool, v_pool, out, batch.tables, batch.seqs,
        head_dim ** -0.5 if scale is None else scale, softcap or 1.0, window or 0, head_dim, batch.block_size,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), out.stride(0), out.stride(1),
        batch.tables.stride(0),
        GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, BLOCK_N=BLOCK_N,
        BLOCK_D=max(16, next_power_of_2(head_dim)), SOFTCAP=bool(softcap), WINDOW=bool(window),
        EXACT_FP32=q.dtype == torch.float32)
    return out


def reference_paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, batch: PagedSeqs,
                              scale: float | None = None, window: int | None = None,
                              softcap: float | None = None) -> torch.Tensor:
    """The spec of `paged_attention`, one sequence at a time in float32 (rows of no sequence are zero)."""
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    group = q.shape[1] // k_pool.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    bs = batch.block_size
    for (start, new, cached), table in zip(batch.seqs.tolist(), batch.tables.long(), strict=True):
        keys = torch.arange(cached + new, device=q.device)
        slots = table[keys // bs] * bs + keys % bs
        k = k_pool[slots].float().repeat_interleave(group, dim=1)  # [L, heads, d]
        v = v_pool[slots].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("thd,lhd->htl", q[start:start + new].float(), k) * scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        q_pos = cached + torch.arange(new, device=q.device)[:, None]  # [new, 1]
        seen = keys[None, :] <= q_pos
        if window:
            seen &= keys[None, :] > q_pos - window
        probs = scores.masked_fill(~seen, float("-inf")).softmax(-1)
        out[start:start + new] = torch.einsum("htl,lhd->thd", probs, v).to(q.dtype)
    return out
