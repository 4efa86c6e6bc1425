"""Seconds a piece of work takes on a device. On CUDA the host only queues kernels, so the
clock is read after a synchronize on both sides (the host waits for the kernels); on CPU the
work is done when the call returns."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def device_seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of fn() including the device work it queued."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0
