"""Per-request records and the statistics the report is made of. Pure functions, no torch."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class RequestRecord:
    """What one system did with one request. Times are seconds on the worker's clock."""

    index: int
    adapter: int | None
    prompt_tokens: int
    output_tokens: int
    start_s: float  # when the request was issued (its arrival)
    first_token_s: float | None  # None when it failed before any token
    end_s: float
    error: str | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.start_s

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (None with fewer than two tokens)."""
        if self.first_token_s is None or self.output_tokens < 2:
            return None
        return (self.end_s - self.first_token_s) / (self.output_tokens - 1)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> RequestRecord:
        return cls(**d)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between ranks (numpy's default).

    NaN for an empty sequence, so a system with no successful request shows as missing.
    """
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN when either is missing or the denominator is zero."""
    if not denominator or math.isnan(denominator) or math.isnan(numerator):
        return math.nan
    return numerator / denominator


@dataclass(frozen=True)
class SystemSummary:
    """One system's figures over one workload."""

    system: str
    n_requests: int
    errors: int
    output_tokens: int
    wall_s: float
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    tpot_p99_ms: float
    peak_rss_mb: float

    def to_json(self) -> dict:
        return asdict(self)


def summarize(system: str, records: Sequence[RequestRecord], peak_rss_mb: float) -> SystemSummary:
    """Throughput over the span from the first issue to the last finish; latencies of successes."""
    ok = [r for r in records if r.error is None]
    wall = (max(r.end_s for r in records) - min(r.start_s for r in records)) if records else 0.0
    tokens = sum(r.output_tokens for r in ok)
    ttfts = [r.ttft_s * 1e3 for r in ok if r.ttft_s is not None]
    tpots = [r.tpot_s * 1e3 for r in ok if r.tpot_s is not None]
    return SystemSummary(
        system=system,
        n_requests=len(records),
        errors=len(records) - len(ok),
        output_tokens=tokens,
        wall_s=wall,
        tokens_per_s=ratio(tokens, wall),
        ttft_p50_ms=percentile(ttfts, 50),
        ttft_p99_ms=percentile(ttfts, 99),
        tpot_p50_ms=percentile(tpots, 50),
        tpot_p99_ms=percentile(tpots, 99),
        peak_rss_mb=peak_rss_mb,
    )
