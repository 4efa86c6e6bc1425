"""Getting the exact adapter version a request names onto a replica.

With a shared registry root there is nothing to do: the version is there. With a per-node root
(`hub_pull`), a version the replica lacks is pulled from the Hub at the repo and commit its
manifest's `source` records (the ingress reads that manifest and sends it along as an
`Origin`), then its weights are checked against the digests the ingress's manifest holds.
A pulled version may get another number locally (`name@2` here may be `name@5` there), so the
fetcher maps the cluster's reference to the local one. Anything that goes wrong raises
`AdapterUnavailableError` naming the reason: only that version's requests fail.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from loradock.registry import AdapterVersion, NotFoundError, Registry, RegistryError
from loradock.runtime.errors import AdapterUnavailableError

log = logging.getLogger(__name__)

# The files that decide what a version computes (the model card may be rewritten by a pull).
WEIGHT_FILES = ("adapter_config.json",)
WEIGHT_SUFFIX = ".safetensors"


def _weights(files: dict[str, dict]) -> dict[str, str]:
    return {rel: entry["sha256"] for rel, entry in files.items()
            if rel in WEIGHT_FILES or rel.endswith(WEIGHT_SUFFIX)}


@dataclass(frozen=True)
class Origin:
    """Where the cluster's copy of a version came from, and what its weights hash to."""

    ref: str
    repo: str
    commit: str
    weights: tuple[tuple[str, str], ...]  # (relpath, sha256), sorted

    @classmethod
    def of(cls, version: AdapterVersion) -> Origin | None:
        """The origin of a version pulled from the Hub; None for one trained or imported here."""
        source = version.manifest.get("source") or {}
        if source.get("kind") != "hub" or not source.get("repo") or not source.get("commit"):
            return None
        weights = tuple(sorted(_weights(version.manifest.get("files") or {}).items()))
        return cls(version.ref, source["repo"], source["commit"], weights)


class VersionFetcher:
    """Maps a cluster reference `name@N` to a version this replica's registry holds (thread-safe)."""

    def __init__(self, registry: Registry, hub_pull: bool) -> None:
        self._registry = registry
        self._hub_pull = hub_pull
        self._lock = threading.Lock()
        self._local: dict[str, str] = {}

    def local_ref(self, ref: str) -> str:
        """The local reference for `ref` once `ensure` has run (else `ref` itself)."""
        with self._lock:
            return self._local.get(ref, ref)

    def ensure(self, ref: str, origin: Origin | None) -> str:
        """Make `ref` servable here and return its local reference."""
        with self._lock:
            if ref in self._local:
                return self._local[ref]
        local = self._find(ref, origin)
        with self._lock:
            self._local[ref] = local
        return local

    def _find(self, ref: str, origin: Origin | None) -> str:
        try:
            version = self._registry.resolve(ref, verify=False)
        except NotFoundError:
            version = None
        if version is not None and (origin is None or self._matches(version, origin)):
            return ref
        if origin is None:
            return ref  # the engine reports the missing version itself, with the registry's words
        if not self._hub_pull:
            raise AdapterUnavailableError(
                f"adapter {ref}: this replica's registry does not hold it (or holds other weights "
                f"under that number) and hub_pull is off")
        return self._pull(origin).ref

    @staticmethod
    def _matches(version: AdapterVersion, origin: Origin) -> bool:
        return tuple(sorted(_weights(version.manifest.get("files") or {}).items())) == origin.weights

    def _pull(self, origin: Origin) -> AdapterVersion:
        name = origin.ref.rpartition("@")[0]
        log.info("pulling %s from the Hub: %s at %s", origin.ref, origin.repo, origin.commit[:12])
        try:
            version = self._registry.pull(origin.repo, revision=origin.commit, name=name)
        except RegistryError as e:
            raise AdapterUnavailableError(f"adapter {origin.ref}: pulling {origin.repo}@{origin.commit[:12]} "
                                          f"failed: {e}") from e
        if not self._matches(version, origin):
            raise AdapterUnavailableError(
                f"adapter {origin.ref}: {origin.repo}@{origin.commit[:12]} does not hold the weights "
                f"the cluster's manifest records (digest mismatch); refusing to serve it")
        return version
