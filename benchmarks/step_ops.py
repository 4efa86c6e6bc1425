"""Torch ops dispatched by one decode step at several batch sizes.

On a GPU every op is at least one kernel launch, so an engine whose op count grows with the
number of running sequences spends its step in Python and launch overhead, not in the
hardware. Counted with a `TorchDispatchMode` on an engine driven step by step.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from loradock.runtime import triton_attention, triton_lora
from loradock.runtime.engine import Engine
from loradock.runtime.sequence import SeqStatus
from loradock.runtime.types import GenerationRequest, SamplingParams
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

# The functions that launch loradock's Triton kernels, each launch counted as one op.
LAUNCHERS = ((triton_attention, "paged_attention"), (triton_lora, "segmented_matmul"))


class OpCounter(TorchDispatchMode):
    """Counts the torch ops dispatched in this thread while active, and each Triton kernel launch
    (with its output allocation) as one: on a GPU a launch dispatches no torch op, and under the
    CPU interpreter it would count the interpreter's own tensor copies instead."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self._originals: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for module, name in LAUNCHERS:
            self._originals.append(getattr(module, name))
            setattr(module, name, self._counted(getattr(module, name)))
        return super().__enter__()

    def __exit__(self, *exc):
        for (module, name), original in zip(LAUNCHERS, self._originals, strict=True):
            setattr(module, name, original)
        self._originals.clear()
        return super().__exit__(*exc)

    def _counted(self, launch):
        def counted(*args, **kwargs):
            self.count += 1
            with _disable_current_modes():
                return launch(*args, **kwargs)
        return counted


def ops_per_decode_step(engine: Engine, adapters: Sequence[str | None], prompt_ids: Sequence[int],
                        sizes: Sequence[int] = (1, 8, 32)) -> dict[str, int]:
    """{running sequences: ops of one step} once every sequence decodes; sequence i uses
    adapters[i % len(adapters)]. `engine` must have been started with run_loop=False."""
    counts = {}
    for n in sizes:
        handles = [engine.submit(GenerationRequest(
            adapter=adapters[i % len(adapters)], prompt_token_ids=tuple(prompt_ids),
            sampling=SamplingParams(max_new_tokens=8, ignore_eos=True))) for i in range(n)]
        seqs = [engine._seqs[h.request_id] for h in handles]
        while any(s.status is not SeqStatus.RUNNING or s.in_prefill for s in seqs):
            if not engine.step():  # adapters still loading
                time.sleep(0.01)
        counter = OpCounter()
        with counter:
            engine.step()
        counts[str(n)] = counter.count
        for h in handles:
            h.cancel()
        engine.step()
    return counts
