"""`SampledTokens`: one step's sampled tokens on their way to the host. With asynchronous
scheduling the engine launches the next step before it reads them, so the read must wait for
the sampling only, not for the step queued after it: on CUDA the tokens are copied into pinned
host memory on the stream and an event marks the copy's end."""

from __future__ import annotations

from collections.abc import Sequence

import torch


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
