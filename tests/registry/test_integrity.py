"""Digest checks, concurrent publishers, crash safety and gc."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from loradock.registry import DigestMismatchError, Registry, lock
from loradock.registry import digests as digests_module

REPO = Path(__file__).resolve().parents[2]


def flip_byte(path: Path, offset: int) -> None:
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("rel", ["adapter_model.safetensors", "adapter_config.json", "README.md"])
def test_one_changed_byte_fails_resolve_and_verify(registry: Registry, lora_dir, rel):
    v = registry.publish(lora_dir, "medical")
    assert registry.resolve("medical").digest == v.digest
    target = v.path / rel
    flip_byte(target, target.stat().st_size // 2)
    with pytest.raises(DigestMismatchError, match=rf"medical@1 .*{rel}: sha256"):
        registry.resolve("medical")
    assert registry.resolve("medical", verify=False).version == 1  # explicitly unchecked
    [result] = registry.verify()
    assert not result.ok and result.ref == "medical@1"
    assert rel in result.problems[0]


def test_verify_rehashes_even_when_stat_looks_unchanged(registry: Registry, lora_dir):
    v = registry.publish(lora_dir, "medical")
    target = v.path / "adapter_model.safetensors"
    st = target.stat()
    flip_byte(target, 100)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert registry.verify("medical@1")[0].problems


def test_missing_and_extra_files(registry: Registry, lora_dir):
    v = registry.publish(lora_dir, "medical", aliases=["prod"])
    (v.path / "README.md").unlink()
    (v.path / "notes.txt").write_text("hi")
    with pytest.raises(DigestMismatchError, match=r"README\.md: missing"):
        registry.resolve("medical@prod")
    [result] = registry.verify()
    assert result.problems == ("README.md: missing", "notes.txt: not listed in the manifest")


def count_hashes(monkeypatch) -> list[Path]:
    """Record every file the digest cache hashes."""
    calls: list[Path] = []
    real = digests_module.sha256_file
    monkeypatch.setattr(digests_module, "sha256_file", lambda p: calls.append(p) or real(p))
    return calls


def test_resolve_hashes_once_per_file_identity(registry: Registry, lora_dir, monkeypatch):
    monkeypatch.setattr(digests_module, "RACY_NS", 0)
    calls = count_hashes(monkeypatch)
    v = registry.publish(lora_dir, "medical")
    registry.resolve("medical")
    assert calls == []  # publish hashed the files it wrote and remembered them
    fresh = Registry(registry.root)  # another process: the hashes are on disk too
    fresh.resolve("medical@1")
    assert calls == []
    flip_byte(v.path / "adapter_config.json", 5)
    with pytest.raises(DigestMismatchError):
        fresh.resolve("medical")
    assert [p.name for p in calls] == ["adapter_config.json"]  # only the changed file was rehashed
    with pytest.raises(DigestMismatchError):  # the changed file's new hash is remembered, not trusted
        Registry(registry.root).resolve("medical")


def test_digest_records_are_only_a_cache(registry: Registry, lora_dir, monkeypatch):
    monkeypatch.setattr(digests_module, "RACY_NS", 0)
    v = registry.publish(lora_dir, "medical")
    store = registry.root / "adapters" / ".digests"
    records = sorted(store.glob("*.json"))
    assert len(records) == 3
    for record in records:  # damaged records: a rehash, never an error
        record.write_text("{not json")
    calls = count_hashes(monkeypatch)
    assert Registry(registry.root).resolve("medical").digest == v.digest
    assert len(calls) == 3
    registry.publish(lora_dir, "medical")
    registry.delete("medical@1")  # drops its records
    assert len(list(store.glob("*.json"))) == 3  # version 2's
    registry.delete("medical@2")
    (store / "stray.json").write_text('{"path": "/nonexistent/file"}')  # e.g. a crash mid-delete
    assert [p.name for p in registry.gc()] == ["stray.json"]
    assert list(store.glob("*.json")) == []


def run_publishers(root: Path, src: Path, name: str, workers: int, rounds: int, start: Path):
    cmd = [sys.executable, "-m", "tests.registry.publisher", str(root), str(src), name, str(rounds), str(start)]
    return [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(workers)]


def test_concurrent_publishers_get_distinct_consecutive_versions(registry: Registry, lora_dir, tmp_path):
    workers, rounds = 4, 3
    start = tmp_path / "go"
    procs = run_publishers(registry.root, lora_dir, "medical", workers, rounds, start)
    time.sleep(0.5)  # let every interpreter start and wait on the start file
    start.touch()
    refs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        refs += out.split()
    assert sorted(refs, key=lambda r: int(r.split("@")[1])) == [f"medical@{i}" for i in range(1, 13)]
    versions = registry.versions("medical")
    assert [v.version for v in versions] == list(range(1, workers * rounds + 1))
    # every (process, round) landed exactly once
    landed = {(v.manifest["metrics"]["pid"], v.manifest["metrics"]["round"]) for v in versions}
    assert len(landed) == workers * rounds
    assert all(r.ok for r in registry.verify())
    assert registry.generation() == workers * rounds


def test_sigkilled_publishes_leave_no_partial_version(registry: Registry, lora_dir, tmp_path):
    rng = random.Random(1234)
    for attempt in range(6):
        start = tmp_path / f"go{attempt}"
        start.touch()
        [proc] = run_publishers(registry.root, lora_dir, "medical", 1, 1000, start)
        assert proc.stdout.readline().startswith("medical@")  # it is publishing in a loop now
        time.sleep(rng.uniform(0, 0.3))  # somewhere inside a later publish
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        # whatever is visible is whole: every version verifies and resolves
        results = registry.verify()
        assert all(r.ok for r in results), results
        numbers = [v.version for v in registry.versions("medical")] if results else []
        assert numbers == list(range(1, len(numbers) + 1))
        for n in numbers:
            registry.resolve(f"medical@{n}")
    staging = registry.root / "adapters" / ".staging"
    # the kills landed inside publishes: their work dirs are still there for gc
    assert [p for p in staging.iterdir() if p.suffix != ".lock"]
    registry.gc()
    assert list(staging.iterdir()) == []
    before = len(registry.versions("medical"))
    assert registry.publish(lora_dir, "medical").version == before + 1


def test_gc_removes_only_dead_leftovers(registry: Registry, lora_dir):
    registry.publish(lora_dir, "medical")
    adapters = registry.root / "adapters"
    staging = adapters / ".staging"
    (staging / "123-dead").mkdir(parents=True)
    (staging / "123-dead" / "version").mkdir()
    (staging / "456-dead.lock").touch()
    (adapters / ".locks" / "ghost.lock").touch()
    (adapters / ".locks" / "acme~gone.lock").touch()
    old_tmp = adapters / "medical" / "aliases" / ".prod.dead.tmp"
    old_tmp.parent.mkdir()
    old_tmp.write_text("1")
    os.utime(old_tmp, (time.time() - 3600, time.time() - 3600))
    fresh_tmp = adapters / ".generation.live.tmp"
    fresh_tmp.write_text("7")
    live_dir = staging / "789-live"
    live_dir.mkdir()
    with lock.held(staging / "789-live.lock"):
        removed = registry.gc()
        assert live_dir.is_dir()  # a publish in progress is never touched
    assert sorted(p.name for p in removed) == [
        ".prod.dead.tmp", "123-dead", "456-dead.lock", "acme~gone.lock", "ghost.lock",
    ]
    assert fresh_tmp.exists()
    assert (adapters / ".locks" / "medical.lock").exists()
    assert registry.resolve("medical").version == 1


def test_dangling_alias_is_reported(registry: Registry, lora_dir):
    from loradock.registry import NotFoundError

    registry.publish(lora_dir, "medical")
    (registry.root / "adapters/medical/aliases").mkdir()
    (registry.root / "adapters/medical/aliases/stale").write_text("9\n")
    with pytest.raises(NotFoundError, match="alias medical@stale points to version 9, which no longer exists"):
        registry.resolve("medical@stale")
    results = {r.ref: r.problems for r in registry.verify()}
    assert results == {"medical@1": (), "medical@stale": ("alias points to missing version 9",)}
