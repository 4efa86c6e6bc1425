"""Host memory that cold adapter loads reuse instead of allocating.

A cold load's cost is mostly new memory, not reading or copying: on this project's VM
(Firecracker, free pages handed back to the host), first touching 20 MB of new pages took
12 ms where copying 20 MB between warm ones took 2.5 ms. So one pool, `HostBlocks`, lends
every buffer a load writes into and takes it back when done:

- `read_tensors` reads a safetensors file into a staging buffer from the pool, for the length
  of a `with` block (the adapter is converted out of it, then the buffer goes back);
- the buffers that hold adapters in the slot layout come from the same pool and go back when
  the adapter cache drops its copy (at once on CPU, where the slots themselves are host memory);
- `HostBlocks.prime` fills the pool with touched buffers when the engine starts, so that the
  first loads after a start do not pay for new pages either.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from loradock.registry.safetensors_header import SafetensorsFormatError, header_length, parse_header

# The floating-point dtypes LoRA weights come in.
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


@contextmanager
def read_tensors(path: Path, blocks: HostBlocks) -> Iterator[dict[str, torch.Tensor]]:
    """Every tensor of a safetensors file, as views of a staging buffer lent by `blocks` for the
    `with` block only (copy what must last). SafetensorsFormatError when the file is malformed."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        staging = blocks.take(size)
        try:
            data = staging.tensor[:size]
            view, done = memoryview(data.numpy()), 0
            while done < size:
                n = f.readinto(view[done:])
                if not n:
                    raise SafetensorsFormatError(f"{path.name}: the file shrank while being read")
                done += n
        except BaseException:
            staging.release()
            raise
    try:
        yield _tensor_views(data, path.name)
    finally:
        staging.release()


def _tensor_views(data: torch.Tensor, name: str) -> dict[str, torch.Tensor]:
    """The tensors of a whole safetensors file held in `data` (uint8), as views of it."""
    size, view = data.numel(), memoryview(data.numpy())
    n = header_length(bytes(view[:8]), size, name)
    tensors = {}
    for tensor, info in parse_header(bytes(view[8:8 + n]), size - 8 - n, name).items():
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise SafetensorsFormatError(f"{name}: tensor {tensor!r} has dtype {info['dtype']}; "
                                         f"LoRA weights are {', '.join(SAFETENSORS_DTYPES)}")
        start, end = (8 + n + offset for offset in info["data_offsets"])
        if end - start != math.prod(info["shape"]) * dtype.itemsize:
            raise SafetensorsFormatError(f"{name}: tensor {tensor!r} has {end - start} bytes for "
                                         f"shape {info['shape']} in {info['dtype']}")
        raw = data[start:end] if start % dtype.itemsize == 0 else data[start:end].clone()  # unpadded header
        tensors[tensor] = raw.view(dtype).view(info["shape"])
    return tensors


class HostBlock:
    """A lease on one pooled buffer (`tensor`, uint8); `release` hands it back, once."""

    def __init__(self, pool: HostBlocks, tensor: torch.Tensor) -> None:
        self._pool = pool
        self.tensor = tensor
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._pool.give(self.tensor)


class HostBlocks:
    """A pool of host buffers, lent by `take` and returned through `HostBlock.release`. It keeps
    at most `keep_bytes` of returned buffers; a buffer is lent for a request of at least half
    its size (so a small adapter does not hold a large buffer)."""

    def __init__(self, keep_bytes: int = 256 * 2**20) -> None:
        self.keep_bytes = keep_bytes
        self._free: list[torch.Tensor] = []  # oldest first
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> HostBlock:
        with self._lock:
            fits = [t for t in self._free if nbytes <= t.numel() <= 2 * max(nbytes, 1)]
            if fits:
                tensor = min(fits, key=torch.Tensor.numel)
                self._free = [t for t in self._free if t is not tensor]
            else:
                tensor = torch.empty(nbytes, dtype=torch.uint8)
        return HostBlock(self, tensor)

    def prime(self, nbytes: int, count: int) -> int:
        """Add up to `count` buffers of `nbytes`, their pages touched, to the pool (no more than
        `keep_bytes` holds), so that the first loads find memory ready; how many were added."""
        with self._lock:
            room = self.keep_bytes - sum(t.numel() for t in self._free)
            n = max(0, min(count, room // max(nbytes, 1)))
            self._free.extend(torch.zeros(nbytes, dtype=torch.uint8) for _ in range(n))  # zeros: touched
        return n

    def give(self, tensor: torch.Tensor) -> None:
        with self._lock:
            self._free.append(tensor)
            while sum(t.numel() for t in self._free) > self.keep_bytes:
                self._free.pop(0)

    @property
    def free_bytes(self) -> int:
        with self._lock:
            return sum(t.numel() for t in self._free)
