"""What `model` means: OpenAI model ids <-> registry references, and the `/v1/models` list.

Every adapter reference a client may use is a model: `name` (the latest version), each
`name@alias` and each `name@N`, beside the base itself. A request's `model` is resolved here to
the concrete `name@N` and the engine is asked for exactly that version, so the response (every
streamed chunk included) can name the version that serves it. Both the resolutions and the
list are cached per registry generation, so an alias move or a new version shows on the next
request, without a restart.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime

from loradock.registry import (
    AdapterVersion,
    InvalidNameError,
    NotFoundError,
    Registry,
    newest_per_metric,
)

from .errors import model_not_found
from .schemas import EvalSummary, ModelCard


@dataclass(frozen=True)
class ServedModel:
    """A resolved `model`: `ref` for the engine (None = the base alone), the id responses carry
    (`name@N`, or the base's name) and the adapter label of the metrics."""

    ref: str | None
    id: str
    label: str


def unservable_reason(manifest: dict, base_fingerprint: str, max_rank: int, base_name: str) -> str:
    """Why a server of the base `base_fingerprint` with `max_rank` cannot serve the version whose
    manifest this is ("" when it can)."""
    trained = manifest.get("base") or {}
    if trained.get("fingerprint") and trained["fingerprint"] != base_fingerprint:
        return (f"trained for base {trained.get('name') or '?'} ({trained['fingerprint'][:12]}), "
                f"this server serves {base_name} ({base_fingerprint[:12]})")
    rank = int(manifest.get("rank") or 0)
    if rank > max_rank:
        return f"rank {rank} is above this server's --max-rank {max_rank}"
    return ""


def _unix(timestamp: str) -> int:
    try:
        return int(datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp())
    except (TypeError, ValueError):
        return 0


class ModelCatalog:
    """Resolves `model` strings and lists model cards for one engine and its registry (thread-safe)."""

    def __init__(self, engine, registry: Registry) -> None:
        self._engine = engine
        self._registry = registry
        self._lock = threading.Lock()
        self._generation: int | None = None
        self._resolved: dict[str, ServedModel] = {}
        self._cards: list[ModelCard] | None = None

    def _current(self) -> None:
        """Drop the caches when the registry changed (one small file read)."""
        generation = self._registry.generation()
        if generation != self._generation:
            self._generation, self._resolved, self._cards = generation, {}, None

    @property
    def base_name(self) -> str:
        return self._engine.info().base_name

    def resolve(self, model: str, route_key: str | None = None) -> ServedModel:
        """`""` or the base's name: the base; `BASE:ADAPTER` or a reference: its concrete version
        (a weighted alias: the version this request goes to, by `route_key`). Raises ApiError 404
        (param `model`) for anything that names no model."""
        model = self._routed(model, route_key)
        with self._lock:
            self._current()
            served = self._resolved.get(model)
        if served is None:
            served = self._resolve(model)
            with self._lock:
                self._resolved[model] = served
        return served

    def _routed(self, model: str, route_key: str | None) -> str:
        """`model` with an alias replaced by the version this request is served by: the engine's
        routes (warm promotion: runtime/promotion.py), else (a cluster's ingress) the registry's."""
        prefix, _, ref = model.rpartition(":")
        if "@" not in ref:
            return model
        route = getattr(self._engine, "route", self._registry.route)
        try:
            routed = route(ref.strip(), route_key)
        except (NotFoundError, InvalidNameError):
            return model  # _resolve says what is wrong with it
        return f"{prefix}:{routed}" if prefix else routed

    def _resolve(self, model: str) -> ServedModel:
        base = self.base_name
        ref = model.strip()
        if ":" in ref:  # BASE:ADAPTER, as SGLang and Ray Serve LLM write it
            named_base, _, ref = ref.partition(":")
            if named_base != base:
                raise model_not_found(model, f"base {named_base!r} is not served here (this server serves {base!r})")
        if not ref or ref == base:
            return ServedModel(None, base, "")
        try:
            version = self._registry.resolve(ref, verify=False)  # the engine verifies when it loads
        except (NotFoundError, InvalidNameError) as e:
            raise model_not_found(model, str(e)) from None
        return ServedModel(version.ref, version.ref, version.name)

    def cards(self) -> list[ModelCard]:
        """The base, then for every adapter: `name`, each `name@alias`, each `name@N`, leaving out
        versions this engine cannot serve (trained for another base, or rank above max_rank);
        each adapter card says where its version is now (`residency`)."""
        with self._lock:
            self._current()
            cards = self._cards
        if cards is None:
            cards = self._build_cards()
            with self._lock:
                self._cards = cards
        return self._with_residency(cards)

    def _with_residency(self, cards: list[ModelCard]) -> list[ModelCard]:
        """The cached cards with each version's tier now: "device" (a slot), "host" (host memory)
        or "disk" (the registry only). A cluster's ingress holds none itself: left out there."""
        resident = getattr(self._engine, "resident_adapters", None)
        if resident is None:
            return cards
        tiers: dict[str, str] = {}
        for r in resident():
            if tiers.get(r.adapter.ref) != "device":
                tiers[r.adapter.ref] = r.tier
        return [card if card.parent is None else card.model_copy(update={"residency": tiers.get(card.root, "disk")})
                for card in cards]

    def card(self, model_id: str) -> ModelCard:
        """The card of `model_id`, also written `BASE:ADAPTER` as generation accepts it."""
        named_base, sep, ref = model_id.partition(":")
        listed = (ref or self.base_name) if sep and named_base == self.base_name else model_id
        for card in self.cards():
            if card.id == listed:
                return card if listed == model_id else card.model_copy(update={"id": model_id})
        raise model_not_found(model_id, "GET /v1/models lists the models served here")

    def _build_cards(self) -> list[ModelCard]:
        info = self._engine.info()
        base = info.base_name
        try:
            base_created = _unix(self._registry.base(base).created_at)
        except (NotFoundError, InvalidNameError):  # served from a directory, not the registry
            base_created = 0
        limits = {"max_model_len": info.max_model_len, "max_prompt_tokens": info.max_prompt_tokens}
        cards = [ModelCard(id=base, created=base_created, root=base, **limits)]

        def fits(v: AdapterVersion) -> bool:
            return not unservable_reason(v.manifest, info.base_fingerprint, info.max_rank, base)

        def evals(v: AdapterVersion) -> list[EvalSummary]:
            fields = EvalSummary.model_fields
            return [EvalSummary(**{k: getattr(r, k) for k in fields})
                    for r in newest_per_metric(self._registry.evals(v))]

        for latest in self._registry.list():
            try:
                versions = {v.version: v for v in self._registry.versions(latest.name)}
                aliases = self._registry.aliases(latest.name)
            except NotFoundError:  # deleted while listing
                continue

            def card(model_id: str, v: AdapterVersion) -> ModelCard:
                return ModelCard(id=model_id, created=_unix(str(v.manifest.get("created_at", ""))),
                                 root=v.ref, parent=base, evals=evals(v), **limits)

            newest = versions[max(versions)]
            if fits(newest):
                cards.append(card(latest.name, newest))
            for alias, number in sorted(aliases.items()):
                if number in versions and fits(versions[number]):
                    cards.append(card(f"{latest.name}@{alias}", versions[number]))
            cards += [card(v.ref, v) for _, v in sorted(versions.items()) if fits(v)]
        return cards
