"""Serving from a registry this process cannot write (a read-only mount, a shared volume).

Reading needs no writes: resolve, list and the change counter only read, and writers in
other processes keep moving aliases and publishing versions, which readers see. The one
thing a reader writes is its digest records (a cache that spares rehashing, digests.py);
they go to a writable directory of the reader's own instead.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .errors import RegistryError
from .fsutil import probe_writable
from .paths import cache_root
from .registry import Registry


def default_digest_dir(root: Path) -> Path:
    """`$XDG_CACHE_HOME/loradock/digests/<hash of the registry path>` (default ~/.cache/...)."""
    tag = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:16]
    return cache_root() / "digests" / tag


def serving_registry(root: str | Path | None, digest_dir: str | Path | None = None) -> tuple[Registry, str]:
    """The registry at `root` set up for serving, and a sentence for the start-up log ("" when
    the registry is writable and keeps its own records). Digest records go to `digest_dir`
    when given, else, for a registry that cannot be written, to `default_digest_dir`."""
    registry = Registry(root)
    writable = registry.is_writable()
    if writable and digest_dir is None:
        return registry, ""
    target = Path(digest_dir).expanduser() if digest_dir is not None else default_digest_dir(registry.root)
    target.mkdir(parents=True, exist_ok=True)
    if not probe_writable(target):
        raise RegistryError(f"the digest cache directory {target} is not writable either")
    note = f"digest records are kept in {target}"
    if not writable:
        note = (f"registry {registry.root} is read-only for this process: serving it as it is "
                f"(alias moves and new versions made by writers are picked up); {note}")
    return Registry(registry.root, digest_dir=target), note
