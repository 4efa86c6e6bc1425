"""`ClusterArgs`: the arguments of the Ray Serve application, one documented field each.

They are the `args:` of a `serve run` / `serve deploy` config file (or `key=value` pairs after
`serve run loradock.runtime.cluster.app:build_app`), and the flags of `loradock cluster serve`.
Values given as strings (the `serve run` command line) are converted to the field's type.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from loradock.runtime import EngineConfig


@dataclass
class ClusterArgs:
    """How many engine replicas, with what resources, serving what."""

    base: str
    """Base model of every replica: a registry base name or a Hugging Face model directory."""

    registry_root: str | None = None
    """Registry root every replica and the ingress read ($LORADOCK_HOME when unset): a shared
    filesystem, or a per-node root that pulls missing versions from the Hub (`hub_pull`)."""

    replicas: int = 1
    """Engine replicas (fixed count; see min_replicas/max_replicas for autoscaling)."""

    num_cpus: float = 1.0
    """CPUs Ray reserves for each engine replica."""

    num_gpus: float = 0.0
    """GPUs Ray reserves for each engine replica (1 = one engine per GPU)."""

    min_replicas: int | None = None
    """Autoscaling: fewest replicas (setting min or max replicas turns autoscaling on)."""

    max_replicas: int | None = None
    """Autoscaling: most replicas."""

    target_ongoing_requests: float | None = None
    """Autoscaling: requests in flight per replica Ray Serve aims for (default: half the
    engine's max_running)."""

    max_ongoing_requests: int | None = None
    """Requests Ray Serve sends one replica at once (default: the engine's max_running, its
    batch width; more wait in the router, which may send them to another replica)."""

    hub_pull: bool = False
    """A replica that lacks a version pulls it from the Hub (the manifest's source repo and
    commit, as the ingress's registry records it) and checks its digest before serving it."""

    auth_token_file: str | None = None
    """File holding the bearer token the HTTP API requires (none: open)."""

    hot_adapters: int = 2
    """The busiest adapter versions (the most requests among the ingress's last 1,000, at least 50)
    that get `hot_homes` homes: Ray loads each on that many replicas and their requests spread over
    them, so one replica is never the only home of the busiest adapter (cluster/hot.py); 0: off."""

    hot_homes: int = 2
    """Replicas a hot adapter version lives on (at most the replica count is useful)."""

    engine: dict[str, Any] = field(default_factory=dict)
    """EngineConfig fields for every replica (max_slots, quantize, max_running, ...)."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.engine) - {f.name for f in dataclasses.fields(EngineConfig)} - {"base"})
        if unknown:
            raise ValueError(f"engine: unknown EngineConfig field(s) {', '.join(unknown)}")
        if self.replicas < 1:
            raise ValueError(f"replicas: must be at least 1, got {self.replicas}")
        if self.hot_adapters < 0 or self.hot_homes < 1:
            raise ValueError(f"hot_adapters must be >= 0 and hot_homes >= 1, got {self.hot_adapters} and "
                             f"{self.hot_homes}")
        if self.max_replicas is not None and self.min_replicas is not None \
                and self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})")

    @property
    def engine_config(self) -> EngineConfig:
        return EngineConfig(base=self.base, **self.engine)

    @property
    def autoscaling(self) -> dict[str, Any] | None:
        """Ray Serve's autoscaling_config, or None for a fixed replica count."""
        if self.min_replicas is None and self.max_replicas is None:
            return None
        target = self.target_ongoing_requests or max(1.0, self.engine_config.max_running / 2)
        low = self.min_replicas if self.min_replicas is not None else 1
        high = self.max_replicas if self.max_replicas is not None else max(low, self.replicas)
        return {"min_replicas": low, "max_replicas": high, "initial_replicas": min(max(self.replicas, low), high),
                "target_ongoing_requests": target}

    @property
    def multiplexed_slots(self) -> int:
        """Versions one replica keeps pinned: the engine's device slots less one, which stays
        free for requests whose version is being loaded (the engine pins at most max_slots - 1)."""
        return max(1, self.engine_config.max_slots - 1)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ClusterArgs:
        """Build from a `serve` config's `args` (strings converted to each field's type)."""
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown argument(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**{k: _convert(k, v, hints[k]) for k, v in values.items()})


def _convert(name: str, value: Any, hint: Any) -> Any:
    if not isinstance(value, str):
        return value
    if isinstance(hint, types.UnionType):  # `int | None`: the type that is not None
        hint = next(t for t in typing.get_args(hint) if t is not type(None))
    kind = typing.get_origin(hint) or hint
    try:
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        if kind in (int, float):
            return kind(value)
        if kind is dict:
            return json.loads(value)
    except ValueError:
        raise ValueError(f"{name}: {value!r} is not a valid {kind.__name__}") from None
    return value
