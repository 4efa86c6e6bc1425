"""`BlockManager`: which KV pool blocks each sequence holds, from admission to release.

The scheduler asks it three things through the engine: may this sequence start (its cached
prefix taken from the prefix cache, room for the rest of its tokens plus a watermark that
running sequences grow into), take the blocks for a planned chunk, give everything back
(finished or preempted). After each step the engine tells it how many tokens each sequence
computed, and blocks that became full are registered in the prefix cache.

Only the engine loop thread calls it (like the pool, it keeps no lock).
"""

from __future__ import annotations

from typing import Protocol

from .kv_cache import KVPool, blocks_for

WATERMARK_FRACTION = 0.01  # of the blocks kept free for running sequences to grow into (vLLM: 1%)


class HoldsBlocks(Protocol):
    """The part of `Sequence` the block manager reads and writes."""

    blocks: list[int]
    computed: int

    @property
    def num_tokens(self) -> int: ...

    def full_block_hashes(self, block_size: int) -> list[bytes]: ...


class BlockManager:
    def __init__(self, pool: KVPool, prefix_caching: bool) -> None:
        self.pool = pool
        self.prefix_caching = prefix_caching
        self.watermark = max(1, int(pool.num_blocks * WATERMARK_FRACTION))

    def admit(self, seq: HoldsBlocks, others_running: bool) -> bool:
        """Give a waiting sequence its blocks to start with, or False (nothing taken) when the
        pool lacks room for all its tokens (prompt, and after a preemption its output so far)
        plus the watermark; with nothing else running the whole pool is its. Blocks of its
        leading tokens come from the prefix cache and count as computed; at least one token is
        always left to compute, since its logits pick the next token."""
        bs = self.pool.block_size
        reuse = self.prefix_caching and seq.reads_prefix_cache
        cached = self.pool.take_cached(seq.full_block_hashes(bs)[:(seq.num_tokens - 1) // bs]) if reuse else []
        need = blocks_for(seq.num_tokens, bs) - len(cached)
        if self.pool.free_blocks < need + (self.watermark if others_running else 0):
            self.pool.free(cached)
            return False
        seq.blocks, seq.computed = cached, len(cached) * bs
        return True

    def grow(self, seq: HoldsBlocks, n: int) -> bool:
        """Take the blocks for seq's next n tokens; False (nothing taken) when the pool is short."""
        return self.pool.grow(seq.blocks, seq.computed + n)

    def computed(self, seq: HoldsBlocks, n: int) -> None:
        """seq's next n tokens now have K/V in its blocks: count them, and register the blocks
        they filled in the prefix cache."""
        before = seq.computed
        seq.computed += n
        bs = self.pool.block_size
        if self.prefix_caching and seq.computed // bs > before // bs:
            hashes = seq.full_block_hashes(bs)
            for i in range(before // bs, seq.computed // bs):
                self.pool.register(seq.blocks[i], hashes[i])

    def release(self, seq: HoldsBlocks) -> None:
        """Give back every block seq holds (cached ones stay cached); it has nothing computed."""
        self.pool.free(seq.blocks)
        seq.computed = 0
