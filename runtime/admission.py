"""`Admitter`: what a waiting sequence must hold to run, taken at admission, given back at its end.

A sequence runs once its adapter sits in a device slot (pinned while it runs) and the paged KV
pool has room for its tokens (less what the prefix cache already holds). Both are taken, or
neither: a sequence that got a slot but no KV room gives the slot back and waits. The scheduler
decides when to ask (`Scheduler.schedule`'s `admit`); this decides the answer.

Only the engine loop thread calls it.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from .adapter_cache import LoadState
from .block_manager import HoldsBlocks
from .errors import AdapterUnavailableError, EngineError
from .scheduler import Admission
from .sequence import Sequence
from .stats import BASE_KEY, EngineStats
from .types import ResolvedAdapter

log = logging.getLogger(__name__)


class SlotCache(Protocol):
    """The part of `AdapterCache` admission uses."""

    def state(self, key: ResolvedAdapter) -> tuple[LoadState, BaseException | None]: ...

    def prefetch(self, key: ResolvedAdapter) -> object: ...

    def acquire(self, key: ResolvedAdapter) -> int | None: ...

    def release(self, key: ResolvedAdapter) -> None: ...


class KVBlocks(Protocol):
    """The part of `BlockManager` admission uses."""

    def admit(self, seq: HoldsBlocks, others_running: bool) -> bool: ...

    def release(self, seq: HoldsBlocks) -> None: ...


class Admitter:
    """Takes a waiting sequence's slot and KV room together at admission, gives both back at its end."""

    def __init__(self, cache: SlotCache, blocks: KVBlocks, stats: EngineStats) -> None:
        self.cache = cache
        self.blocks = blocks
        self.stats = stats

    def admit(self, seq: Sequence, others_running: bool) -> tuple[Admission, EngineError | None]:
        """ADMIT (slot pinned and `seq.slot` set; the KV pool has room for its tokens, and the
        blocks of a cached prefix are its), WAIT (nothing taken: the adapter is still loading,
        or no slot or KV room is free; ask again next step), or DROP with the error to fail the
        request with (its adapter cannot be served)."""
        slot = 0
        if seq.adapter is not None:
            slot, error = self._take_slot(seq.adapter)
            if error is not None:
                return Admission.DROP, error
            if slot is None:
                return Admission.WAIT, None
        if not self.blocks.admit(seq, others_running):
            if seq.adapter is not None:
                self.cache.release(seq.adapter)
            return Admission.WAIT, None
        seq.slot = slot
        if seq.computed:  # taken from the prefix cache
            self.stats.add(seq.adapter.ref if seq.adapter else BASE_KEY, cached_prompt_tokens=seq.computed)
        if seq.admitted_at is None:  # a preempted sequence keeps its first admission time
            seq.admitted_at = time.monotonic()
        return Admission.ADMIT, None

    def _take_slot(self, adapter: ResolvedAdapter) -> tuple[int | None, EngineError | None]:
        """The adapter's device slot, pinned; None while it loads or no slot is free."""
        state, error = self.cache.state(adapter)
        if state is LoadState.FAILED:
            return None, (error if isinstance(error, EngineError)
                          else AdapterUnavailableError(f"adapter {adapter.ref}: {error}"))
        if state is LoadState.ABSENT:  # evicted from host memory since submit: read it again
            self.cache.prefetch(adapter)
            return None, None
        if state is LoadState.LOADING:
            return None, None
        try:
            return self.cache.acquire(adapter), None
        except Exception as e:  # writing the slot failed: this adapter cannot be served
            log.exception("placing adapter %s in a slot failed", adapter.ref)
            return None, AdapterUnavailableError(f"adapter {adapter.ref}: {e}")

    def release(self, seq: Sequence) -> None:
        """Give back the KV blocks and the slot pin of a running sequence (finished or preempted)."""
        self.blocks.release(seq)
        if seq.adapter is not None:
            self.cache.release(seq.adapter)
        seq.slot = 0
