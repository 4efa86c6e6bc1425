"""The registry: one root directory holding `bases/` and `adapters/`."""

from __future__ import annotations

from pathlib import Path

from .bases import BaseStore
from .paths import default_root


class Registry:
    """A loradock registry rooted at `root` (default: `$LORADOCK_HOME` or `~/.loradock`)."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_root()
        self.bases = BaseStore(self.root)
