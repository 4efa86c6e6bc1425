"""Where the registry lives on disk."""

from __future__ import annotations

import os
from pathlib import Path

ENV_HOME = "LORADOCK_HOME"


def default_root() -> Path:
    """`$LORADOCK_HOME`, or `~/.loradock` when it is unset."""
    env = os.environ.get(ENV_HOME)
    return Path(env).expanduser() if env else Path.home() / ".loradock"
