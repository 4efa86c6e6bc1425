"""Publish and pull on a real full disk (a tmpfs of 1 MiB): a clear error, nothing partial, and the
same call succeeds once there is space."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from loradock.registry import Registry
from loradock.registry.errors import DiskFullError

from tests.full_disk import files_under, fill, small_disk
from tests.registry.hub_server import commit_files
from tests.registry.test_hub import adapter_files, hub_repo


@pytest.fixture
def full_home(tmp_path: Path, session_home: Path):
    """A registry root on a 1 MiB tmpfs that shares the session's bases (outside the tmpfs)."""
    with small_disk(tmp_path / "disk") as disk:
        root = disk / "home"
        root.mkdir()
        os.symlink(session_home / "bases", root / "bases")
        yield root


def assert_nothing_partial(registry: Registry, before: list[str]) -> None:
    assert registry.list() == []
    registry.gc()
    after = [p for p in files_under(registry.root) if not p.startswith("adapters/.locks")]
    assert after == [p for p in before if not p.startswith("adapters/.locks")], after


def test_publish_on_a_full_disk_fails_clearly_and_leaves_nothing(full_home: Path, lora_dir):
    registry = Registry(full_home)
    registry.publish(lora_dir, "warmup")  # the registry's own directories exist
    registry.delete("warmup")
    before = files_under(full_home)
    # room for the small files, not for the weights: the failure comes in the middle of a copy
    filler = fill(full_home.parent, leave_bytes=8192)
    with pytest.raises(DiskFullError, match=r"publishing .* as medical failed: no space left") as err:
        registry.publish(lora_dir, "medical", aliases=["prod"])
    assert "Nothing was changed" in str(err.value)
    assert "medical" not in [v.name for v in registry.list()]
    assert_nothing_partial(registry, before)
    filler.unlink()
    version = registry.publish(lora_dir, "medical", aliases=["prod"])
    assert registry.resolve("medical@prod") == version


def test_pull_on_a_full_disk_fails_clearly_and_leaves_nothing(full_home: Path, olah, hub_env, lora_dir):
    hub_env(olah.endpoint)
    commit = commit_files(hub_repo(olah, "acme/full"), adapter_files(lora_dir), "adapter")
    registry = Registry(full_home)
    registry.publish(lora_dir, "warmup")
    registry.delete("warmup")
    before = files_under(full_home)
    filler = fill(full_home.parent)
    with pytest.raises(DiskFullError, match=r"pulling acme/full@.* failed: no space left"):
        registry.pull("acme/full", revision=commit)
    assert_nothing_partial(registry, before)
    filler.unlink()
    assert registry.pull("acme/full", revision=commit).ref == "acme/full@1"
