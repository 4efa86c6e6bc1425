"""Where the registry, and loradock's caches, live on disk."""

from __future__ import annotations

import os
from pathlib import Path

ENV_HOME = "LORADOCK_HOME"


def default_root() -> Path:
    """`$LORADOCK_HOME`, or `~/.loradock` when it is unset."""
    env = os.environ.get(ENV_HOME)
    return Path(env).expanduser() if env else Path.home() / ".loradock"


def cache_root() -> Path:
    """loradock's caches (digest records, compiled graphs, the benchmark registry):
    `$XDG_CACHE_HOME/loradock`, or `~/.cache/loradock` when it is unset."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loradock"
