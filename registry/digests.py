"""Check a version's files against its manifest, cheaply.

A file's sha256 is remembered in-process, keyed by (path, size, mtime_ns, ctime_ns,
inode): any write, chmod or replacement changes the key and forces a rehash. Like
git's "racy" rule, a hash is not remembered while the file's mtime is within
`RACY_NS` of now, because a write in the same clock tick would keep mtime_ns.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from .fsutil import sha256_file

RACY_NS = 2_000_000_000


class DigestCache:
    """sha256 of files, recomputed only when their stat identity changes. Thread-safe."""

    def __init__(self, max_entries: int = 4096) -> None:
        self._entries: dict[tuple, str] = {}
        self._max = max_entries
        self._lock = threading.Lock()

    def sha256(self, path: Path, st: os.stat_result | None = None) -> str:
        st = st or os.stat(path)
        key = (str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        with self._lock:
            hit = self._entries.get(key)
        if hit is not None:
            return hit
        digest = sha256_file(path)
        if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > RACY_NS:
            with self._lock:
                if len(self._entries) >= self._max:
                    self._entries.clear()
                self._entries[key] = digest
        return digest


def file_problems(version_dir: Path, files: dict[str, dict], cache: DigestCache | None) -> list[str]:
    """Each file of the manifest that is missing or whose size or sha256 differs.

    With `cache=None` every file is rehashed (a full verify).
    """
    problems = []
    for rel, want in sorted(files.items()):
        path = version_dir / rel
        try:
            st = os.stat(path)
        except FileNotFoundError:
            problems.append(f"{rel}: missing")
            continue
        if st.st_size != want["size"]:
            problems.append(f"{rel}: size {st.st_size} != {want['size']} recorded")
            continue
        got = cache.sha256(path, st) if cache is not None else sha256_file(path)
        if got != want["sha256"]:
            problems.append(f"{rel}: sha256 {got[:12]}… != {want['sha256'][:12]}… recorded")
    return problems
