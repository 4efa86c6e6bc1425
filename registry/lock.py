"""Cross-process locks on files inside the registry root (`filelock`, i.e. flock on Unix).

Lock files are left in place on release so waiters share one inode. `gc` may remove
a lock file it holds; `held` therefore re-checks after acquiring that the path still
names the locked inode and retries otherwise, so a waiter that queued on a removed
file never believes it holds the lock.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout


def _same_inode(lock: FileLock, path: Path) -> bool:
    fd = getattr(lock._context, "lock_file_fd", None)  # filelock keeps the open descriptor here
    if fd is None:
        return True  # cannot tell; behave like a plain FileLock
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


@contextmanager
def held(path: Path, timeout: float = -1) -> Iterator[None]:
    """Hold the lock at `path` (created if missing) for the body; wait up to `timeout` s (-1: forever)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        lock = FileLock(str(path), timeout=timeout)
        lock.acquire()
        if _same_inode(lock, path):
            break
        lock.release()  # gc removed the file while we waited on it: lock the new one
    try:
        yield
    finally:
        lock.release()


def try_remove(path: Path) -> bool:
    """Remove the lock file at `path` if nobody holds it. True when removed."""
    path = Path(path)
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return False
    try:
        if not _same_inode(lock, path):
            return False
        path.unlink(missing_ok=True)
        return True
    finally:
        lock.release()


def is_held(path: Path) -> bool:
    """True when another process (or lock object) holds the lock at `path`."""
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return True
    lock.release()
    return False
