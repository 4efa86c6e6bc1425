"""Per-sequence KV cache, preallocated for the sequence's whole life.

A sequence's final length is bounded at admission (prompt + max_new_tokens), so its
cache is allocated once at that size: no torch.cat growth per step (which re-copies
the whole cache every token), and freeing it is dropping one tensor. The allocator
keeps a global token budget so admission waits instead of running out of memory.
"""

from __future__ import annotations

import threading

import torch


class SequenceKV:
    """K and V of one sequence for every layer: [layers, kv_heads, capacity, head_dim] each.

    During a forward, layer l writes the step's new keys at [length, length + n) and
    attends over [0, length + n); `advance(n)` commits the step once the forward is done,
    so a failed forward leaves the committed cache untouched.
    """

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_layers, kv_heads, capacity, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.length = 0  # committed tokens

    def write(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values ([kv_heads, n, head_dim]) and return all of them so far."""
        n = k_new.shape[1]
        end = self.length + n
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: {end} tokens > capacity {self.capacity}")
        self.k[layer, :, self.length:end] = k_new
        self.v[layer, :, self.length:end] = v_new
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


class KVAllocator:
    """Hands out SequenceKV objects within a total budget of `max_tokens` cached tokens."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, max_tokens: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self._shape = (num_layers, kv_heads, head_dim)
        self.max_tokens = max_tokens
        self.dtype = dtype
        self.device = device
        self._used = 0
        self._lock = threading.Lock()

    @property
    def used_tokens(self) -> int:
        return self._used

    def bytes_per_token(self) -> int:
        layers, heads, dim = self._shape
        return 2 * layers * heads * dim * torch.empty((), dtype=self.dtype).element_size()

    def try_allocate(self, capacity: int) -> SequenceKV | None:
        """A cache for `capacity` tokens, or None while the budget is used up by others."""
        if capacity > self.max_tokens:
            raise ValueError(f"a sequence of {capacity} tokens exceeds the KV budget of {self.max_tokens}")
        with self._lock:
            if self._used + capacity > self.max_tokens:
                return None
            self._used += capacity
        layers, heads, dim = self._shape
        return SequenceKV(layers, heads, dim, capacity, self.dtype, self.device)

    def free(self, kv: SequenceKV) -> None:
        with self._lock:
            self._used -= kv.capacity
