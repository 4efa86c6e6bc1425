"""Where the engine's adapters come from: registry references resolved to concrete versions
(cached per registry generation) and versions read into host memory, with registry errors
turned into the engine's own."""

from __future__ import annotations

import threading
import time

import torch
from loradock.registry import (
    DigestMismatchError,
    InvalidAdapterError,
    InvalidNameError,
    NotFoundError,
    Registry,
    RegistryError,
)
from loradock.registry.version import AdapterVersion

from .adapter_weights import LoadedAdapter, ServedModel, read_adapter
from .errors import AdapterNotFoundError, AdapterUnavailableError, EngineError, InvalidRequestError
from .types import ResolvedAdapter


def engine_error(e: RegistryError, ref: str) -> EngineError:
    """Map a registry error to the engine error a caller should see."""
    if isinstance(e, NotFoundError):
        return AdapterNotFoundError(str(e))
    if isinstance(e, InvalidNameError):
        return InvalidRequestError(f"adapter: {e}")
    if isinstance(e, (DigestMismatchError, InvalidAdapterError)):
        return AdapterUnavailableError(f"adapter {ref}: {e}")
    return AdapterUnavailableError(f"adapter {ref}: {e}")


class AdapterSource:
    """Resolve references and read adapter versions for one served base model (thread-safe)."""

    def __init__(self, registry: Registry, served: ServedModel, dtype: torch.dtype, poll_s: float) -> None:
        self.registry = registry
        self.served = served
        self.dtype = dtype
        self.poll_s = poll_s
        self._resolved: dict[str, AdapterVersion] = {}  # ref -> version, valid for one generation
        self._generation: int | None = None
        self._last_poll = 0.0
        self._lock = threading.Lock()

    def resolve(self, ref: str) -> AdapterVersion:
        """`ref` -> version, cached until the registry's generation changes (polled every
        `poll_s`), so alias moves and new versions are seen without a restart."""
        with self._lock:
            now = time.monotonic()
            if now - self._last_poll >= self.poll_s:
                self._last_poll = now
                generation = self.registry.generation()
                if generation != self._generation:
                    self._generation = generation
                    self._resolved.clear()
            version = self._resolved.get(ref)
        if version is None:
            try:
                version = self.registry.resolve(ref)
            except RegistryError as e:
                raise engine_error(e, ref) from e
            with self._lock:
                self._resolved[ref] = version
        return version

    def key(self, ref: str) -> ResolvedAdapter:
        """The concrete version `ref` names now."""
        version = self.resolve(ref)
        return ResolvedAdapter(version.name, version.version, version.digest)

    def read(self, key: ResolvedAdapter) -> LoadedAdapter:
        """Registry -> host memory (runs in the loader pool): re-verify digests, read, validate."""
        try:
            version = self.registry.resolve(key.ref)  # re-checks the files against the manifest
        except RegistryError as e:
            raise engine_error(e, key.ref) from e
        if version.digest != key.digest:
            raise AdapterUnavailableError(f"adapter {key.ref} changed on disk (digest {version.digest[:12]})")
        return read_adapter(key, version.path, version.manifest, self.served, self.dtype)
