"""How many sequences one KV budget runs at once: the paged pool against a cache that reserves
`prompt + max_new_tokens` per sequence at admission (loradock's engine before the pool).

The workload asks for long outputs (`max_new_tokens`) that stop early (after `stop_after`
tokens, as a stop string, EOS or a client hanging up would end them). A reserving cache admits
`capacity // (prompt + max_new_tokens)` sequences whatever they really use; the paged engine is
driven step by step and its largest number of running sequences is counted.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from loradock.runtime.engine import Engine
from loradock.runtime.types import GenerationRequest, SamplingParams


def paged_concurrency(engine: Engine, prompt_ids: Sequence[int], requests: int, max_new_tokens: int,
                      stop_after: int) -> int:
    """Most sequences running at once while `requests` requests are served (run_loop=False)."""
    handles = [engine.submit(GenerationRequest(prompt_token_ids=tuple(prompt_ids), sampling=SamplingParams(
        max_new_tokens=max_new_tokens, ignore_eos=True))) for _ in range(requests)]
    peak = 0
    while not all(h.done for h in handles):
        for seq in list(engine.scheduler.running):
            if len(seq.output_ids) >= stop_after:
                seq.handle.cancel()  # the output ends early
        if not engine.step():
            time.sleep(0.001)
        peak = max(peak, len(engine.scheduler.running))
    return peak


def kv_concurrency(engine: Engine, prompt_ids: Sequence[int], requests: int = 96, max_new_tokens: int = 240,
                   stop_after: int = 16) -> dict:
    """Both caches' concurrency on the same KV budget (the engine's pool) and their ratio."""
    reserved = len(prompt_ids) + max_new_tokens
    preallocated = engine.kv.capacity_tokens // reserved
    paged = paged_concurrency(engine, prompt_ids, requests, max_new_tokens, stop_after)
    return {
        "kv_cache_tokens": engine.kv.capacity_tokens,
        "kv_cache_bytes": engine.kv.nbytes,
        "prompt_tokens": len(prompt_ids),
        "max_new_tokens": max_new_tokens,
        "stop_after": stop_after,
        "max_running": engine.config.max_running,
        "preallocated_concurrency": preallocated,
        "paged_concurrency": paged,
        "ratio": paged / preallocated if preallocated else float("nan"),
    }
