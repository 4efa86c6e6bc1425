"""A replica whose registry lacks a version pulls it from the Hub (a real olah mirror) at the
repo and commit the cluster's manifest records, and checks its weights before serving it."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
from loradock.registry import Registry
from loradock.runtime.errors import AdapterUnavailableError

from tests.conftest import TINY_BASE
from tests.registry.conftest import hub_env, lora_dir, lora_dir_2, olah  # noqa: F401 - fixtures
from tests.registry.hub_server import commit_files
from tests.registry.test_hub import adapter_files, hub_repo

pytest.importorskip("ray")
from loradock.runtime.cluster.versions import Origin, VersionFetcher


def fresh_registry(root: Path, session_home: Path) -> Registry:
    root.mkdir()
    (root / "bases").symlink_to(session_home / "bases")
    return Registry(root)


def test_a_missing_version_is_pulled_by_its_recorded_source_and_checked(
        olah, hub_env, lora_dir, lora_dir_2, session_home, tmp_path):  # noqa: F811
    hub_env(olah.endpoint)
    commit = commit_files(hub_repo(olah, "acme/med"), adapter_files(lora_dir), "v1")
    cluster = fresh_registry(tmp_path / "cluster", session_home)
    cluster.publish(lora_dir_2, "med", base=TINY_BASE)  # med@1 was trained here
    pulled = cluster.pull("acme/med", revision=commit, name="med")
    assert pulled.ref == "med@2"
    origin = Origin.of(pulled)
    assert origin is not None and (origin.repo, origin.commit) == ("acme/med", commit)
    assert Origin.of(cluster.resolve("med@1")) is None  # trained, not pulled: nothing to pull

    replica = fresh_registry(tmp_path / "replica", session_home)
    with pytest.raises(AdapterUnavailableError, match="hub_pull is off"):
        VersionFetcher(replica, hub_pull=False).ensure("med@2", origin)
    fetcher = VersionFetcher(replica, hub_pull=True)
    local = fetcher.ensure("med@2", origin)
    assert local == "med@1"  # the first version of med on this replica: mapped, not renumbered
    assert fetcher.local_ref("med@2") == "med@1"
    shutil.rmtree(tmp_path / "hf-home", ignore_errors=True)
    assert (replica.resolve("med@1").path / "adapter_model.safetensors").read_bytes() == \
        (lora_dir / "adapter_model.safetensors").read_bytes()

    other = fresh_registry(tmp_path / "other", session_home)
    forged = dataclasses.replace(origin, weights=tuple((rel, "0" * 64) for rel, _ in origin.weights))
    with pytest.raises(AdapterUnavailableError, match="digest mismatch"):
        VersionFetcher(other, hub_pull=True).ensure("med@2", forged)
    with pytest.raises(AdapterUnavailableError, match="pulling acme/gone"):
        VersionFetcher(other, hub_pull=True).ensure("gone@1", dataclasses.replace(origin, ref="gone@1",
                                                                                 repo="acme/gone"))


def test_a_version_already_in_a_shared_registry_is_used_as_it_is(lora_dir, session_home, tmp_path):  # noqa: F811
    shared = fresh_registry(tmp_path / "shared", session_home)
    version = shared.publish(lora_dir, "law", base=TINY_BASE)
    assert VersionFetcher(shared, hub_pull=False).ensure(version.ref, Origin.of(version)) == "law@1"
