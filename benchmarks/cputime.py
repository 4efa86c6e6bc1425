"""CPU time spent by processes over a stretch of work.

On a shared machine wall-clock throughput depends on what else runs; output tokens
per CPU-second of the serving process(es) does not, so the report shows both.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import psutil


class CpuMeter:
    """`with CpuMeter([pid, ...]) as cpu: ...` then `cpu.seconds`: user + system CPU seconds
    that this process and the given ones spent inside the block."""

    def __init__(self, other_pids: Sequence[int] = ()) -> None:
        self.processes = [psutil.Process(os.getpid()), *(psutil.Process(p) for p in other_pids)]
        self.seconds = 0.0
        self._start = 0.0

    def _total(self) -> float:
        return sum(t.user + t.system for t in (p.cpu_times() for p in self.processes))

    def __enter__(self) -> CpuMeter:
        self._start = self._total()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = self._total() - self._start
