"""Check a version's files against its manifest, cheaply.

A file's sha256 is remembered, keyed by its stat identity (size, mtime_ns, ctime_ns,
inode, device): any write, chmod or replacement changes the key and forces a rehash.
ctime cannot be set from user space, so restoring mtime after an edit does not hide
it. Like git's "racy" rule, a hash is not remembered while the file's mtime or ctime
is within `RACY_NS` of now, because a write in the same clock tick would keep them.

The memory is per process, and optionally also on disk (one small JSON record per
file under the registry's `.digests/`), so a fresh server process does not rehash
every adapter it loads (sha256 runs at about 220 MB/s here: 90 ms for a rank-16
SmolLM2 adapter). Records are only a cache: a missing, unreadable or stale one means
a rehash, and `verify` always rehashes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path

from .fsutil import sha256_file

RACY_NS = 2_000_000_000
log = logging.getLogger(__name__)


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


class DigestCache:
    """sha256 of files, recomputed only when their stat identity changes. Thread-safe.

    With `store` (a directory), remembered hashes are also kept there for other processes.
    """

    def __init__(self, store: Path | None = None, max_entries: int = 4096) -> None:
        self._entries: dict[tuple, str] = {}
        self._max = max_entries
        self._lock = threading.Lock()
        self._store = store
        self._write_failed = False  # warned once

    def sha256(self, path: Path, st: os.stat_result | None = None) -> str:
        path = Path(os.path.abspath(path))  # records are shared by processes with other cwds
        st = st or os.stat(path)
        key = (str(path), *_stat_key(st))
        with self._lock:
            hit = self._entries.get(key)
        if hit is None:
            hit = self._read_record(path, st)
        if hit is not None:
            self._remember_in_memory(key, hit)
            return hit
        digest = sha256_file(path)
        if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > RACY_NS:
            self._remember_in_memory(key, digest)
            self._write_record(path, st, digest)
        return digest

    def remember(self, path: Path, digest: str) -> None:
        """Record `digest` for a file this process has just written and hashed itself (a
        publish: the file is read-only and nobody else can have written it since)."""
        path = Path(os.path.abspath(path))
        st = os.stat(path)
        self._remember_in_memory((str(path), *_stat_key(st)), digest)
        self._write_record(path, st, digest)

    def forget(self, path: Path) -> None:
        """Drop the on-disk record of a file that is being deleted."""
        record = self._record_path(Path(os.path.abspath(path)))
        if record is not None:
            with contextlib.suppress(OSError):
                record.unlink(missing_ok=True)

    def forget_missing(self) -> list[Path]:
        """Remove the on-disk records of files that no longer exist (for gc)."""
        removed = []
        if self._store is None or not self._store.is_dir():
            return removed
        for record in self._store.glob("*.json"):
            try:
                gone = not Path(json.loads(record.read_text())["path"]).exists()
            except (OSError, ValueError, KeyError, TypeError):
                gone = True  # unreadable: worthless as a cache
            if gone:
                record.unlink(missing_ok=True)
                removed.append(record)
        return removed

    def _remember_in_memory(self, key: tuple, digest: str) -> None:
        with self._lock:
            if len(self._entries) >= self._max:
                self._entries.clear()
            self._entries[key] = digest

    def _record_path(self, path: Path) -> Path | None:
        if self._store is None:
            return None
        return self._store / (hashlib.sha256(str(path).encode()).hexdigest()[:32] + ".json")

    def _read_record(self, path: Path, st: os.stat_result) -> str | None:
        record = self._record_path(path)
        if record is None:
            return None
        try:
            data = json.loads(record.read_bytes())
            if data["path"] == str(path) and data["stat"] == _stat_key(st):
                return str(data["sha256"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return None

    def _write_record(self, path: Path, st: os.stat_result, digest: str) -> None:
        """Best effort and not fsynced: a lost record only costs a rehash."""
        record = self._record_path(path)
        if record is None:
            return
        body = json.dumps({"path": str(path), "stat": _stat_key(st), "sha256": digest}).encode()
        tmp = record.with_name(f".{record.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            record.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(body)
            os.replace(tmp, record)
        except OSError as e:  # a read-only registry or a full disk: serve on, rehashing on open
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            if not self._write_failed:
                self._write_failed = True
                log.warning("cannot write digest records to %s (%s); serving on, rehashing files when "
                            "they are opened (give a writable digest cache directory to avoid that)",
                            self._store, e.strerror or e)


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
