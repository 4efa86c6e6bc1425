"""What the KV prefix cache saves on a domain workload: every request of an adapter starts with
that adapter's system prompt, then a question of its own.

The same requests run through one engine with `prefix_caching` off and one with it on (driven
step by step, so both see identical batches), and the probe reports the wall time of each, their
ratio, and how many prompt tokens the cache served instead of a prefill. The first request of
each adapter runs alone first, as earlier traffic would have: requests admitted in one step
cannot share blocks that none of them has finished yet.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence

from loradock.runtime.engine import Engine
from loradock.runtime.types import GenerationRequest, SamplingParams

FIRST_PLAIN_TOKEN = 100  # as in workload.py: small ids are special tokens


def domain_requests(adapters: Sequence[str], per_adapter: int, system_len: int, question_len: int,
                    max_new_tokens: int, vocab_size: int, seed: int = 0) -> list[GenerationRequest]:
    """per_adapter requests per adapter, interleaved round-robin: its system prompt + a question."""
    rng = random.Random(seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(FIRST_PLAIN_TOKEN, vocab_size) for _ in range(n)]

    systems = {a: tokens(system_len) for a in adapters}
    return [GenerationRequest(adapter=a, prompt_token_ids=tuple(systems[a] + tokens(question_len)),
                              sampling=SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True))
            for _ in range(per_adapter) for a in adapters]


def served_seconds(engine: Engine, waves: Sequence[Sequence[GenerationRequest]]) -> float:
    """Wall time to serve each wave of requests after the other (run_loop=False engine)."""
    start = time.perf_counter()
    for wave in waves:
        handles = [engine.submit(r) for r in wave]
        while not all(h.done for h in handles):
            if not engine.step():
                time.sleep(0.001)
        for h in handles:
            h.result()  # raise if any failed
    return time.perf_counter() - start


def prefix_cache_probe(make_engine: Callable[[bool], Engine], adapters: Sequence[str], vocab_size: int,
                       per_adapter: int = 4, system_len: int = 192, question_len: int = 16,
                       max_new_tokens: int = 8) -> dict:
    """The domain workload with the prefix cache off, then on. `make_engine(prefix_caching)`
    returns a started engine (run_loop=False); it is shut down here."""
    requests = domain_requests(adapters, per_adapter, system_len, question_len, max_new_tokens, vocab_size)
    out: dict = {"adapters": len(adapters), "requests": len(requests), "system_tokens": system_len,
                 "question_tokens": question_len, "max_new_tokens": max_new_tokens}
    waves = (requests[:len(adapters)], requests[len(adapters):])
    for enabled in (False, True):
        engine = make_engine(enabled)
        try:
            out["on_s" if enabled else "off_s"] = served_seconds(engine, waves)
            if enabled:
                cached = sum(c["cached_prompt_tokens"] for c in engine.stats()["adapters"].values())
                out["cached_prompt_fraction"] = cached / sum(len(r.prompt_token_ids) for r in requests)
        finally:
            engine.shutdown(drain=False)
    out["speedup"] = out["off_s"] / out["on_s"]
    return out
