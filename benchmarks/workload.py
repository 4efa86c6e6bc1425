"""Seeded benchmark workloads, after S-LoRA and Punica. Pure functions, no torch.

A workload is a list of requests, each naming an adapter (by index), exact prompt
token ids, an exact output length (EOS ignored) and, for open-loop runs, an arrival
time. The same spec and seed always give the same workload, so every system in a
run (and every run with that seed) sees identical requests.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass

ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
RANKS = (8, 16)
TARGET_SETS = (ATTN_TARGETS + MLP_TARGETS, ATTN_TARGETS)

# Token ids below this are left out of prompts: small ids are special tokens in
# SmolLM2's vocabulary (<|endoftext|>, <|im_start|>, ...).
FIRST_PLAIN_TOKEN = 100


@dataclass(frozen=True)
class AdapterSpec:
    """One generated adapter: its registry name, LoRA rank and target modules."""

    name: str
    rank: int
    targets: tuple[str, ...]

    @property
    def alpha(self) -> int:
        return 2 * self.rank

    @property
    def has_mlp(self) -> bool:
        return any(t in MLP_TARGETS for t in self.targets)


@dataclass(frozen=True)
class WorkloadSpec:
    """What to generate. Lengths are inclusive ranges, drawn uniformly."""

    n_adapters: int = 32
    n_requests: int = 64
    seed: int = 0
    alpha: float = 1.0  # power-law popularity exponent over adapters
    prompt_len: tuple[int, int] = (16, 128)
    output_len: tuple[int, int] = (16, 64)
    rate: float | None = None  # requests/s for Poisson arrivals; None = closed loop
    vocab_size: int = 49152

    def __post_init__(self) -> None:
        if self.n_adapters < 0 or self.n_requests < 1:
            raise ValueError("need n_adapters >= 0 and n_requests >= 1")
        for label, (lo, hi) in (("prompt_len", self.prompt_len), ("output_len", self.output_len)):
            if not 1 <= lo <= hi:
                raise ValueError(f"{label} must be a range 1 <= low <= high, got {(lo, hi)}")
        if self.rate is not None and self.rate <= 0:
            raise ValueError(f"rate must be positive requests/s, got {self.rate}")
        if self.vocab_size <= FIRST_PLAIN_TOKEN:
            raise ValueError(f"vocab_size must exceed {FIRST_PLAIN_TOKEN}")


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload."""

    index: int
    adapter: int | None  # index into the adapter list; None = the base model alone
    prompt_token_ids: tuple[int, ...]
    max_new_tokens: int
    arrival_s: float | None = None  # offset from the run's start; None in a closed loop

    def to_json(self) -> dict:
        d = asdict(self)
        d["prompt_token_ids"] = list(self.prompt_token_ids)
        return d

    @classmethod
    def from_json(cls, d: dict) -> BenchRequest:
        return cls(**{**d, "prompt_token_ids": tuple(d["prompt_token_ids"])})


def adapter_specs(n: int, prefix: str = "bench") -> list[AdapterSpec]:
    """`n` adapters cycling through ranks 8/16 and attention-only / attention+MLP targets."""
    combos = list(itertools.product(TARGET_SETS, RANKS))
    width = max(4, len(str(n)))
    return [
        AdapterSpec(f"{prefix}-{i:0{width}d}", rank=combos[i % len(combos)][1], targets=combos[i % len(combos)][0])
        for i in range(n)
    ]


def power_law_weights(n: int, alpha: float = 1.0) -> list[float]:
    """Normalised popularity of `n` items: weight of the i-th (0-based) is proportional to 1/(i+1)^alpha."""
    if n < 1:
        raise ValueError("need at least one item")
    raw = [1.0 / (i + 1) ** alpha for i in range(n)]
    total = sum(raw)
    return [w / total for w in raw]


def sample_adapters(n_adapters: int, count: int, alpha: float, rng: random.Random) -> list[int | None]:
    """`count` adapter indices drawn by power-law popularity; all None when there are no adapters.

    Popularity ranks are shuffled over the adapters, so the most popular adapter is not
    always adapter 0 (whose rank and targets are fixed by `adapter_specs`).
    """
    if n_adapters == 0:
        return [None] * count
    order = list(range(n_adapters))
    rng.shuffle(order)
    cumulative = list(itertools.accumulate(power_law_weights(n_adapters, alpha)))
    picks = [bisect.bisect_left(cumulative, rng.random() * cumulative[-1]) for _ in range(count)]
    return [order[min(p, n_adapters - 1)] for p in picks]


def poisson_arrivals(rate: float, count: int, rng: random.Random) -> list[float]:
    """Arrival offsets (s) of a Poisson process with `rate` requests/s, starting near 0."""
    t, out = 0.0, []
    for _ in range(count):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def make_workload(spec: WorkloadSpec) -> list[BenchRequest]:
    """The requests of `spec`: the same spec always yields the same list."""
    # Two streams: prompts, lengths and arrivals do not depend on the number of adapters, so
    # runs at different N (and the base-only baseline) see the very same token sequences.
    rng = random.Random(f"{spec.seed}/requests")
    adapters = sample_adapters(spec.n_adapters, spec.n_requests, spec.alpha, random.Random(f"{spec.seed}/adapters"))
    arrivals: Sequence[float | None] = (
        poisson_arrivals(spec.rate, spec.n_requests, rng) if spec.rate else [None] * spec.n_requests
    )
    requests = []
    for i, (adapter, arrival) in enumerate(zip(adapters, arrivals, strict=True)):
        prompt_len = rng.randint(*spec.prompt_len)
        prompt = tuple(rng.randrange(FIRST_PLAIN_TOKEN, spec.vocab_size) for _ in range(prompt_len))
        requests.append(BenchRequest(i, adapter, prompt, rng.randint(*spec.output_len), arrival))
    return requests


def without_adapters(requests: Sequence[BenchRequest]) -> list[BenchRequest]:
    """The same requests served by the base model alone (for the LoRA-overhead baseline)."""
    return [BenchRequest(r.index, None, r.prompt_token_ids, r.max_new_tokens, r.arrival_s) for r in requests]
