"""A change counter for cheap polling: one small file, bumped atomically on every change.

Readers (the runtime) read it once per poll and reload only when it moved.
"""

from __future__ import annotations

from pathlib import Path

from . import lock
from .fsutil import atomic_write_bytes


class Generation:
    """The counter stored in `path` (missing file = 0)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock_path = self.path.with_name(self.path.name + ".lock")

    def read(self) -> int:
        try:
            return int(self.path.read_text().strip() or 0)
        except FileNotFoundError:
            return 0

    def bump(self) -> int:
        """Increment under a cross-process lock; return the new value."""
        with lock.held(self._lock_path):
            value = self.read() + 1
            atomic_write_bytes(self.path, f"{value}\n".encode())
        return value
