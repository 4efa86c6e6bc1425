"""The per-forward batch context: what the attention function and LoRA layers need to know
about the packed batch of one engine step.

The model's own forward signature cannot carry it to every linear layer, so it is
published in a `ContextVar` for exactly the duration of one forward (`use_context`).
A ContextVar (unlike a module global) is private to the thread running the forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch

from .batching import AttentionGroup, SlotGroups
from .triton_attention import PagedSeqs


@dataclass(frozen=True)
class AttentionBatch:
    """What the attention function needs: where the step's new keys/values go in the paged pool
    and which cached ones each query reads: as gathered groups with masks (the sdpa backend) or
    as block tables the kernel reads (triton)."""

    k_pool: torch.Tensor  # [layers, pool slots, kv_heads, head_dim]
    v_pool: torch.Tensor  # [layers, pool slots, kv_heads, head_dim]
    write_index: torch.Tensor  # [T] pool slot of each new token
    groups: tuple[AttentionGroup, ...]  # sdpa: at most two calls, decode tokens and prompt chunks
    paged: PagedSeqs | None = None  # triton: every sequence in one kernel launch


@dataclass(frozen=True)
class LoRABatch:
    """Token -> adapter slot bookkeeping for the LoRA layers."""

    token_slots: torch.Tensor  # [T] long, on the model's device; 0 = no adapter
    runs: tuple[tuple[int, int, int], ...]  # (start, end, slot): `batching.find_runs` of the packed tokens
    run_table: torch.Tensor  # [G, 3] on the model's device: the runs as (start, length, slot); int32 (int64 static)
    longest_run: int  # tokens in the longest run
    slots_present: tuple[int, ...]  # distinct non-zero slots in this batch
    groups: SlotGroups  # the same tokens as a padded per-slot block
    # A captured step (cuda_graphs.py): its tensors are persistent inputs whose values change
    # between replays, so the layers take no path that depends on them (every slot, full rank).
    static: bool = False


# Tokens per row of a captured step's run table: the LoRA kernels' block of tokens (BLOCK_M).
STATIC_RUN_PIECE = 16


def static_lora_batch(token_slots: torch.Tensor, run_table: torch.Tensor | None = None) -> LoRABatch:
    """The LoRA layers' view of a captured step over `token_slots` [rows]. Its runs are the rows
    of `run_table` [R, 3] (start, length, slot; `batching.run_pieces` of the step's runs, at most
    STATIC_RUN_PIECE tokens each, rows of length 0 unused): a persistent input, rewritten before
    each replay, so a kernel's grid is R programs per column block whatever the step holds, and
    the tokens of one adapter share its weight loads. By default one run per token."""
    rows = token_slots.shape[0]
    if run_table is None:
        run_table = torch.stack([torch.arange(rows, device=token_slots.device), torch.ones_like(token_slots),
                                 token_slots], dim=1).long()  # [rows, 3]
    return LoRABatch(token_slots=token_slots, runs=(), run_table=run_table, longest_run=STATIC_RUN_PIECE,
                     slots_present=(), groups=SlotGroups((), 1, None, None, rows, ()), static=True)


@dataclass(frozen=True)
class BatchContext:
    lora: LoRABatch
    attention: AttentionBatch | None = None
    # The model's LoRA layers by `boundary_index`: how a compiled graph's opaque op finds its layer.
    lora_layers: tuple = ()


_current: ContextVar[BatchContext | None] = ContextVar("loradock_batch", default=None)


def current_context() -> BatchContext | None:
    """The batch context of the forward running in this thread, or None outside one."""
    return _current.get()


@contextlib.contextmanager
def use_context(ctx: BatchContext) -> Iterator[BatchContext]:
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)
