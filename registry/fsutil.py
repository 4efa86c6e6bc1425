"""Small durable-file helpers: every write that must survive a crash goes through here."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import DiskFullError

CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename or create inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file and directory below `path` (inclusive)."""
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so readers see the old file or the new one, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: object) -> None:
    """Atomically write `obj` as indented, key-sorted JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> dict:
    """Read a JSON object from `path`."""
    with Path(path).open(encoding="utf-8") as f:
        return json.load(f)


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def is_no_space(e: BaseException) -> bool:
    """True for the errors a full disk or an exhausted quota raise, however deeply wrapped."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            return True
        e = e.__cause__ or e.__context__
    return False


@contextmanager
def no_space_errors(what: str, where: Path) -> Iterator[None]:
    """Turn ENOSPC / EDQUOT inside the body into a DiskFullError saying what failed and what to do."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        if not is_no_space(e):
            raise
        raise DiskFullError(
            f"{what} failed: no space left on the disk (or quota) holding {where}. Nothing was "
            "changed; free some space and retry (`loradock adapters gc` removes leftovers of "
            "interrupted publishes)"
        ) from e


def probe_writable(directory: Path) -> bool:
    """Whether a file can be created in `directory` now (tried and removed at once)."""
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".write-probe.", suffix=".tmp")
    except OSError:
        return False
    os.close(fd)
    os.unlink(tmp)
    return True
