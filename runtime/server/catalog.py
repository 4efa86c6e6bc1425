"""Answers for the non-generation RPCs, as plain views: what the registry holds and what
the engine has resident, loading and unloading adapters, and the server's description."""

from __future__ import annotations

import dataclasses
import time
from importlib import metadata

import psutil
from loradock.registry import Registry
from loradock.registry.quantization import QuantizationRecipe, recipe_mismatch, recorded_recipe
from loradock.runtime.server.views import (
    AdapterVersionView,
    AdapterView,
    LoadResult,
    ServerInfo,
    TrustView,
)


def _residency(engine) -> tuple[set[tuple[str, int]], set[tuple[str, int]], set[tuple[str, int]]]:
    """(on device, in host memory, pinned) as sets of (name, version)."""
    device, host, pinned = set(), set(), set()
    for entry in engine.resident_adapters():
        key = (entry.adapter.name, entry.adapter.version)
        (device if entry.tier == "device" else host).add(key)
        if entry.pinned:
            pinned.add(key)
    return device, host, pinned


def _quantization(manifest: dict, served: QuantizationRecipe) -> dict[str, str]:
    """The recipe a version was trained with and how the served one differs, for its view."""
    trained = recorded_recipe(manifest)
    return {"trained_quantization": trained.describe() if trained else "",
            "quantization_mismatch": recipe_mismatch(manifest, served)}


def _trust(engine, version) -> dict:
    """Who signed a version and whether the server's trust policy lets it be served."""
    status = engine.adapters.trust_status(version)
    return {"signer": status.signer, "trust": TrustView(status.state, status.reason)}


def _servable(manifest: dict) -> dict:
    """Whether the runtime serves the version, as its manifest records (versions published before
    the record existed say nothing: the engine decides when it reads them)."""
    reasons = manifest.get("not_servable_because") or []
    return {"servable": manifest.get("servable", True) is not False, "not_servable_reason": "; ".join(reasons)}


def list_adapters(registry: Registry, engine, name: str | None = None) -> list[AdapterView]:
    """Every adapter (or only `name`) with its versions, aliases and cache residency."""
    names = [name] if name else [v.name for v in registry.list()]
    device, host, pinned = _residency(engine)
    views = []
    for adapter_name in names:
        versions = registry.versions(adapter_name)  # raises NotFoundError for an unknown name
        aliases = registry.aliases(adapter_name)
        by_version: dict[int, list[str]] = {}
        for alias, number in sorted(aliases.items()):
            by_version.setdefault(number, []).append(alias)
        views.append(AdapterView(
            name=adapter_name,
            versions=tuple(
                AdapterVersionView(
                    version=v.version,
                    digest=v.digest,
                    aliases=tuple(by_version.get(v.version, ())),
                    created_at=str(v.manifest.get("created_at", "")),
                    rank=int(v.manifest.get("rank") or 0),
                    on_device=(v.name, v.version) in device,
                    in_host_memory=(v.name, v.version) in host,
                    pinned=(v.name, v.version) in pinned,
                    **_quantization(v.manifest, engine.recipe),
                    **_trust(engine, v),
                    **_servable(v.manifest),
                )
                for v in versions
            ),
            aliases=aliases,
            base_name=str((versions[-1].manifest.get("base") or {}).get("name") or ""),
        ))
    return views


def load_adapter(engine, ref: str, *, pin: bool) -> LoadResult:
    """Load `ref` into a device slot (pinned if asked); reports how long the call took."""
    start = time.perf_counter()
    resolved = engine.load_adapter(ref, pin=pin)
    return LoadResult(adapter=resolved, load_ms=(time.perf_counter() - start) * 1000)


def unload_adapter(engine, ref: str) -> bool:
    """Drop `ref`'s version from the caches; False when it was not resident."""
    return engine.unload_adapter(ref)


def loradock_version() -> str:
    try:
        return metadata.version("loradock")
    except metadata.PackageNotFoundError:  # running from a checkout that was never installed
        return "unknown"


def server_info(engine) -> ServerInfo:
    info = engine.info()
    # From the process table, not a value recorded at start: a restarted server cannot repeat it.
    process = psutil.Process()
    return ServerInfo(**dataclasses.asdict(info), loradock_version=loradock_version(),
                      pid=process.pid, start_time=process.create_time())
