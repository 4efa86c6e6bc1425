"""Small transfers between the host and the device that do not wait for the device.

With asynchronous scheduling the engine queues step N + 1 before it reads step N's tokens and
samples them, so nothing between may wait for the device's queue: a plain copy of a host list
to the GPU (`torch.tensor(data, device=...)`, from pageable memory) waits for every kernel
queued before it, and so does `.tolist()` of a GPU tensor.
- `to_device`: a host list as a device tensor through pinned memory, copied asynchronously (the
  caching host allocator keeps the pinned block until its copy has run).
- `SampledTokens`: one step's sampled tokens, copied into pinned host memory on the stream with an
  event after the copy, so reading them waits for the sampling alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(data: Sequence | torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`data` (a host list or tensor) as a tensor on `device`, without waiting for the device's
    queue.

    >>> to_device([1, 2], torch.device("cpu")).tolist()
    [1, 2]
    """
    host = torch.as_tensor(data, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class SampledTokens:
    """`tokens` [rows] on the device (the next step's inputs read them there), `picked` the
    (sequence, row) pairs sampled, and `logits` the step's logits (for log probabilities)."""

    def __init__(self, tokens: torch.Tensor, picked: Sequence[tuple[object, int]], logits: torch.Tensor) -> None:
        self.tokens, self.picked, self.logits = tokens, list(picked), logits
        self.rows = {id(seq): row for seq, row in self.picked}  # a sequence's row in `tokens`
        self._ready: torch.cuda.Event | None = None
        if tokens.is_cuda:
            self._host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._host.copy_(tokens, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = tokens

    def tolist(self) -> list[int]:
        """The tokens on the host: waits for the copy alone (the step's one wait for the device)."""
        if self._ready is not None:
            self._ready.synchronize()
        return self._host.tolist()
