"""`loradock adapters canary`: a canary's versions side by side, read from a server's /metrics.

The engine counts every finished request under the concrete version that served it
(`loradock_engine_<counter>_total{adapter,version}` and the latency histograms
`loradock_engine_time_to_first_token_seconds` / `..._request_duration_seconds`), so a weighted
alias's stable and canary versions can be compared while traffic is split. Behind a cluster's
ingress the replicas' counters (`loradock_replica_*`) are summed instead; they carry no latencies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from loradock.runtime.stats import histogram_quantile

COUNTERS = ("requests", "errors", "prompt_tokens", "generated_tokens")
LATENCIES = ("time_to_first_token_seconds", "request_duration_seconds")


@dataclass
class VersionFigures:
    """What the server counted for one version."""

    counters: dict[str, float] = field(default_factory=dict)
    buckets: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # latency -> (le, cumulative)

    def quantile(self, latency: str, q: float) -> float | None:
        """The q-quantile of a latency histogram (None without observations)."""
        return histogram_quantile(self.buckets.get(latency, []), q)


def version_figures(metrics_text: str, adapter: str) -> dict[int, VersionFigures]:
    """{version: its figures} for adapter `adapter` from a Prometheus text page."""
    figures: dict[int, VersionFigures] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:  # by sample name: pages differ in how they type families
            labels = sample.labels
            if labels.get("adapter") != adapter or not labels.get("version", "").isdigit():
                continue
            stat = sample.name.removeprefix("loradock_engine_").removeprefix("loradock_replica_")
            into = figures.setdefault(int(labels["version"]), VersionFigures())
            if stat.removesuffix("_total") in COUNTERS and stat.endswith("_total"):
                stat = stat.removesuffix("_total")
                into.counters[stat] = into.counters.get(stat, 0.0) + sample.value
            elif stat.removesuffix("_bucket") in LATENCIES and stat.endswith("_bucket"):
                into.buckets.setdefault(stat.removesuffix("_bucket"), []).append((float(labels["le"]), sample.value))
    return figures


def rows(figures: Mapping[int, VersionFigures], weights: Mapping[int, int],
         name: str) -> tuple[Sequence[str], list[Sequence[object]]]:
    """The side-by-side table: one row per version the alias sends traffic to."""
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.0f}"

    headers = ("VERSION", "WEIGHT", "REQUESTS", "ERRORS", "ERROR RATE", "TOKENS OUT", "TTFT P50 MS", "TTFT P99 MS",
               "DURATION P50 MS")
    out = []
    for version, weight in sorted(weights.items(), key=lambda item: -item[1]):
        f = figures.get(version, VersionFigures())
        requests, errors = f.counters.get("requests", 0.0), f.counters.get("errors", 0.0)
        out.append((f"{name}@{version}", f"{weight}%", f"{requests:.0f}", f"{errors:.0f}",
                    f"{errors / requests:.1%}" if requests else "-", f"{f.counters.get('generated_tokens', 0):.0f}",
                    ms(f.quantile("time_to_first_token_seconds", 0.5)),
                    ms(f.quantile("time_to_first_token_seconds", 0.99)),
                    ms(f.quantile("request_duration_seconds", 0.5))))
    return headers, out
