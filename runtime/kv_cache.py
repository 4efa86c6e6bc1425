"""Paged KV cache: one pool of fixed-size token blocks shared by every sequence.

A sequence owns a block table (a list of block ids) that grows by one block every
`block_size` tokens and is returned whole when the sequence ends or is preempted, so
memory is held only for tokens that exist, never for tokens a request might still
generate. The pool stores each layer's keys and values as flat token slots
[num_blocks * block_size, kv_heads, head_dim]: token p of a sequence lives in slot
`table[p // block_size] * block_size + p % block_size` (`slot_index`).

Block 0 is the null block: all zeros, never handed out. Attention metadata points every padded
or out-of-context key there, so the rest of the pool may be left uninitialised (`torch.empty`:
on CPU the memory is committed only as blocks are first written) and a gathered key is always
either one the sequence wrote or a zero.

Only the engine loop thread touches the pool, so it keeps no lock.
"""

from __future__ import annotations

import math

import torch


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks that hold `num_tokens` tokens.

    >>> blocks_for(0, 16), blocks_for(1, 16), blocks_for(16, 16), blocks_for(17, 16)
    (0, 1, 1, 2)
    """
    return -(-num_tokens // block_size)


class KVPool:
    """K and V for every layer: [layers, (num_blocks + 1) * block_size, kv_heads, head_dim] each:
    `num_blocks` usable blocks after the null block 0."""

    NULL_BLOCK = 0

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block (got {num_blocks})")
        shape = (num_layers, (num_blocks + 1) * block_size, kv_heads, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.k[:, :block_size] = 0  # the null block
        self.v[:, :block_size] = 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks, 0, -1))  # a stack: the last freed block is reused first

    @staticmethod
    def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @classmethod
    def blocks_in_budget(cls, budget_bytes: int, block_size: int, num_layers: int, kv_heads: int,
                         head_dim: int, dtype: torch.dtype) -> int:
        """How many blocks fit in `budget_bytes`."""
        per_block = block_size * cls.bytes_per_token(num_layers, kv_heads, head_dim, dtype)
        return math.floor(budget_bytes / per_block)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_tokens(self) -> int:
        """Tokens' worth of blocks held by sequences (whole blocks)."""
        return (self.num_blocks - len(self._free)) * self.block_size

    @property
    def nbytes(self) -> int:
        """Bytes of the usable blocks (K and V)."""
        return self.capacity_tokens * self.k[:, 0].numel() * self.k.element_size() * 2

    def grow(self, table: list[int], num_tokens: int) -> bool:
        """Extend `table` so it holds `num_tokens` tokens; all or nothing (False: too few free blocks)."""
        need = blocks_for(num_tokens, self.block_size) - len(table)
        if need <= 0:
            return True
        if need > len(self._free):
            return False
        for _ in range(need):
            table.append(self._free.pop())
        return True

    def free(self, table: list[int]) -> None:
        """Return every block of `table` to the pool and empty it."""
        self._free.extend(reversed(table))
        table.clear()
