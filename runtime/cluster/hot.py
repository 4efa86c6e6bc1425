"""Hot adapters live on more than one replica.

Ray Serve routes a multiplexed model id to the replicas that hold it, so an adapter version's
traffic stays on one replica, and the busiest adapter can saturate its one home while others
idle (ray-project/ray#65691). `HotVersions` watches the ingress's last `window` requests; the
`top_k` versions with at least `min_requests` of them get `homes` model ids instead of one
(`name@N`, `name@N#1`, ...), each request taking one by a hash of its route key (or its id), so
Ray gives each id a home of its own: the version is loaded on up to `homes` replicas and its
requests spread over them. A replica reads the version from the id before the `#`
(`version_of`). Cold versions keep their one id, so affinity (and the hit rate) stays as it was.
"""

from __future__ import annotations

import hashlib
import threading
from collections import Counter, deque

SHARD = "#"


def version_of(model_id: str) -> str:
    """The `name@N` a (possibly sharded) model id names.

    >>> version_of("medical@3#1"), version_of("medical@3")
    ('medical@3', 'medical@3')
    """
    return model_id.partition(SHARD)[0]


class HotVersions:
    """Recent traffic per version and the model id each request goes out with (thread-safe)."""

    def __init__(self, top_k: int = 2, homes: int = 2, window: int = 1000, min_requests: int = 50) -> None:
        self.top_k, self.homes, self.min_requests = top_k, homes, min_requests
        self._recent: deque[str] = deque(maxlen=window)
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def model_id(self, ref: str, key: str) -> str:
        """Count a request for version `ref` and give its model id: `ref` itself, or for a hot
        version one of its `homes` ids, by a stable hash of `key` (one caller, one home).

        >>> hot = HotVersions(top_k=1, homes=2, window=100, min_requests=10)
        >>> sorted({hot.model_id("a@1", f"user-{i}") for i in range(20)})  # hot once it has 10 requests
        ['a@1', 'a@1#1']
        >>> hot.model_id("b@1", "user-1")  # not among the top 1
        'b@1'
        """
        with self._lock:
            if len(self._recent) == self._recent.maxlen:
                self._counts[self._recent[0]] -= 1
            self._recent.append(ref)
            self._counts[ref] += 1
            hot = self.top_k > 0 and self.homes > 1 and self._counts[ref] >= self.min_requests and ref in {
                r for r, _ in self._counts.most_common(self.top_k)}
        if not hot:
            return ref
        shard = int.from_bytes(hashlib.sha256(f"{ref}\0{key}".encode()).digest()[:8], "big") % self.homes
        return ref if shard == 0 else f"{ref}{SHARD}{shard}"

    def hot(self) -> list[str]:
        """The versions now spread over several homes."""
        with self._lock:
            return [r for r, n in self._counts.most_common(self.top_k) if n >= self.min_requests]
