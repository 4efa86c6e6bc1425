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
from dataclasses import dataclass, field

import torch

from .kv_cache import SequenceKV


@dataclass(frozen=True)
class SeqSpan:
    """One sequence's tokens inside the packed batch."""

    kv: SequenceKV
    start: int  # first packed index
    end: int  # one past the last packed index


@dataclass(frozen=True)
class LoRABatch:
    """Token -> adapter slot bookkeeping for the LoRA layers."""

    token_slots: torch.Tensor  # [T] long, on the model's device; 0 = no adapter
    segments: tuple[tuple[int, int, int], ...]  # (start, end, slot) runs over the packed tokens
    slots_present: tuple[int, ...]  # distinct non-zero slots in this batch
    decode_only: bool  # every sequence contributes exactly one token


@dataclass(frozen=True)
class BatchContext:
    lora: LoRABatch
    seqs: tuple[SeqSpan, ...] = field(default=())


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
