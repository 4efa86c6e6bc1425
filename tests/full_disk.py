"""A real full disk for tests: a size-limited tmpfs mounted by the test (needs root and mount)."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def small_disk(path: Path, size: str = "1m") -> Iterator[Path]:
    """Mount a tmpfs of `size` at `path` for the body; skip the test where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    uid = os.geteuid()
    who = "root, but mounting is not permitted" if uid == 0 else f"needs root; running as uid {uid}"
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no full disk to test on: no mount command here")
    if done.returncode != 0:
        why = done.stderr.strip().splitlines()[0] if done.stderr.strip() else f"exit {done.returncode}"
        pytest.skip(f"no full disk to test on: cannot mount a size-limited tmpfs here ({who}): {why}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path, leave_bytes: int = 0) -> Path:
    """Fill the filesystem holding `directory` with one file, then free `leave_bytes` of it."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        chunk = b"\0" * 4096
        while True:
            try:
                os.write(fd, chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                break
        size = os.fstat(fd).st_size
        os.ftruncate(fd, max(0, size - leave_bytes))
    finally:
        os.close(fd)
    return filler


def files_under(root: Path) -> list[str]:
    """Every file below `root` (relative paths, sorted): what a failed write may have left."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir())
