"""Per-adapter counters (requests, tokens, errors, cache behaviour), safe to read from any thread."""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass

BASE_KEY = "<base>"  # counters of requests served by the base model alone


@dataclass
class AdapterCounters:
    requests: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # taken from the KV prefix cache instead of prefilled
    generated_tokens: int = 0
    errors: int = 0
    cache_hits: int = 0  # admitted while already in a device slot
    loads: int = 0  # read from the registry into host memory
    slot_loads: int = 0  # copied into a device slot
    evictions: int = 0  # removed from a device slot


class EngineStats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_adapter: dict[str, AdapterCounters] = {}

    def add(self, key: str, **deltas: int) -> None:
        """Increment counters of `key` ("name@version" or BASE_KEY)."""
        with self._lock:
            counters = self._by_adapter.setdefault(key, AdapterCounters())
            for field_name, delta in deltas.items():
                setattr(counters, field_name, getattr(counters, field_name) + delta)

    def snapshot(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {key: asdict(c) for key, c in sorted(self._by_adapter.items())}
