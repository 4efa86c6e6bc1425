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

Prefix caching: once a block is full its contents are fixed, so the pool may keep them for later
sequences. A full block is registered under a hash chained over the adapter version and every
token up to its end (`block_hashes`); a new sequence whose leading blocks hash the same takes
those blocks (a reference each) instead of prefilling them. Blocks are reference-counted; one
that no sequence holds keeps its contents and its hash until the pool needs it for a new block
(least recently released first), so a domain's shared system prompt, or a preempted sequence's
own prompt, is prefilled once. A sequence only writes past the tokens it took from the cache,
which always end on a block boundary, so shared blocks are never written.

Only the engine loop thread touches the pool, so it keeps no lock.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections import OrderedDict
from collections.abc import Sequence

import torch


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks that hold `num_tokens` tokens.

    >>> blocks_for(0, 16), blocks_for(1, 16), blocks_for(16, 16), blocks_for(17, 16)
    (0, 1, 1, 2)
    """
    return -(-num_tokens // block_size)


def block_hashes(context: str, tokens: Sequence[int], block_size: int, known: list[bytes]) -> list[bytes]:
    """Extend `known` (the hashes of the first len(known) full blocks) to every full block of
    `tokens`, and return it. Block i's hash covers `context` (whatever besides the tokens decides
    the K/V: the adapter version) and tokens[:(i + 1) * block_size], chained through block i - 1's.

    >>> a = block_hashes("law@1", list(range(10)), 4, [])
    >>> len(a), a == block_hashes("law@1", list(range(9)), 4, [])
    (2, True)
    >>> block_hashes("med@1", list(range(10)), 4, [])[0] == a[0]  # another adapter: other K/V
    False
    """
    parent = known[-1] if known else hashlib.blake2b(context.encode(), digest_size=16).digest()
    for i in range(len(known), len(tokens) // block_size):
        chunk = array("q", tokens[i * block_size:(i + 1) * block_size]).tobytes()
        parent = hashlib.blake2b(parent + chunk, digest_size=16).digest()
        known.append(parent)
    return known


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
        self._refs = [0] * (num_blocks + 1)  # sequences holding each block
        self._by_hash: dict[bytes, int] = {}  # cached full blocks: hash -> block
        self._hash_of: dict[int, bytes] = {}  # and back
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached blocks no one holds, LRU first

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
        """Blocks no sequence holds (cached ones included: they are reused when needed)."""
        return len(self._free) + len(self._idle)

    @property
    def used_tokens(self) -> int:
        """Tokens' worth of blocks held by sequences (whole blocks)."""
        return (self.num_blocks - self.free_blocks) * self.block_size

    @property
    def cached_blocks(self) -> int:
        """Full blocks whose contents are kept for reuse (held or not)."""
        return len(self._by_hash)

    @property
    def nbytes(self) -> int:
        """Bytes of the usable blocks (K and V)."""
        return self.capacity_tokens * self.k[:, 0].numel() * self.k.element_size() * 2

    def grow(self, table: list[int], num_tokens: int) -> bool:
        """Extend `table` so it holds `num_tokens` tokens; all or nothing (False: too few free blocks)."""
        need = blocks_for(num_tokens, self.block_size) - len(table)
        if need <= 0:
            return True
        if need > self.free_blocks:
            return False
        for _ in range(need):
            if self._free:
                block = self._free.pop()
            else:  # evict the least recently released cached block
                block, _ = self._idle.popitem(last=False)
                del self._by_hash[self._hash_of.pop(block)]
            self._refs[block] = 1
            table.append(block)
        return True

    def free(self, table: list[int]) -> None:
        """Release every block of `table` and empty it. A block no one holds any more goes back to
        the pool, and stays cached if it is registered (its last block is evicted first)."""
        for block in reversed(table):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._idle[block] = None
                else:
                    self._free.append(block)
        table.clear()

    def take_cached(self, hashes: Sequence[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of `hashes` present, each with a reference taken
        (give them back with `free`)."""
        table: list[int] = []
        for h in hashes:
            block = self._by_hash.get(h)
            if block is None:
                break
            if self._refs[block] == 0:
                del self._idle[block]
            self._refs[block] += 1
            table.append(block)
        return table

    def register(self, block: int, block_hash: bytes) -> None:
        """Cache the full `block` (held by the caller) under `block_hash`. A hash already cached
        keeps its block (two sequences computed the same tokens): this one stays private."""
        if block_hash not in self._by_hash and block not in self._hash_of:
            self._by_hash[block_hash] = block
            self._hash_of[block] = block_hash
