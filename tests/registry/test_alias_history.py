"""Alias history and rollback: every move of an alias is recorded (when, from, to, what, who, why),
`rollback` walks back through it, and a process killed at any write step of a move leaves the
alias on its old or its new target with a history that says which."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from loradock.registry import NotFoundError, Registry, RegistryError
from loradock.registry.alias_history import who

from loradock import cli


@pytest.fixture
def three(registry: Registry, tiny_base, lora_dir: Path, lora_dir_2: Path) -> Registry:
    """`m` with versions 1-3, alias prod on 1."""
    registry.publish(lora_dir, "m", base=tiny_base.name, aliases=["prod"])
    registry.publish(lora_dir_2, "m", base=tiny_base.name)
    registry.publish(lora_dir, "m", base=tiny_base.name)
    return registry


def test_moves_are_recorded_and_rollback_walks_back(three: Registry):
    three.tag("m@2", "prod", reason="canary passed")
    three.tag("m@3", "prod")
    assert three.rollback("m", "prod", reason="bad answers").ref == "m@2"
    assert three.aliases("m")["prod"] == 2
    assert three.rollback("m", "prod").ref == "m@1"  # again: further back, not forth
    with pytest.raises(RegistryError, match="did not exist before"):
        three.rollback("m", "prod")  # before 1 the alias did not exist: untag says that
    changes = three.alias_history("m", "prod")["prod"]
    assert [(c.action, c.before, c.after) for c in changes] == [
        ("tag", None, 1), ("tag", 1, 2), ("tag", 2, 3), ("rollback", 3, 2), ("rollback", 2, 1)]
    assert [c.reason for c in changes] == ["published", "canary passed", "", "bad answers", ""]
    assert {c.by for c in changes} == {who()} and "@" in who()
    assert all(c.applied for c in changes) and changes[0].time.endswith("+00:00")


def test_untag_and_forced_delete_are_recorded_and_rollback_restores(three: Registry):
    three.tag("m@3", "staging")
    three.untag("m", "staging", reason="retired")
    three.tag("m@2", "prod")
    three.delete("m@2", force=True)
    history = three.alias_history("m")
    assert [(c.action, c.after) for c in history["staging"]] == [("tag", 3), ("untag", None)]
    assert [(c.action, c.before, c.after, c.reason) for c in history["prod"]] == [
        ("tag", None, 1, "published"), ("tag", 1, 2, ""), ("delete", 2, None, "m@2 deleted")]
    assert three.rollback("m", "staging").ref == "m@3"  # an untag is undone like any move
    with pytest.raises(NotFoundError):  # prod's previous target, m@2, no longer exists
        three.rollback("m", "prod")
    assert "prod" not in three.aliases("m")  # and nothing moved


def test_an_alias_without_history_cannot_be_rolled_back(three: Registry):
    (three.root / "adapters" / "m" / "alias-history" / "prod.jsonl").unlink()  # as written before histories
    with pytest.raises(RegistryError, match="no earlier target on record"):
        three.rollback("m", "prod")
    with pytest.raises(NotFoundError, match="no alias 'nope'"):
        three.rollback("m", "nope")


def test_the_cli_shows_history_and_rolls_back(three: Registry, capsys):
    home = str(three.root)
    assert cli.main(["--home", home, "adapters", "tag", "m@3", "prod", "--reason", "ship it"]) == 0
    assert cli.main(["--home", home, "adapters", "rollback", "m@prod", "--reason", "regression"]) == 0
    assert "m@prod -> m@1 (rolled back)" in capsys.readouterr().out
    assert cli.main(["--home", home, "adapters", "history", "m"]) == 0
    table = capsys.readouterr().out
    assert "ship it" in table and "regression" in table and "rollback" in table
    assert cli.main(["--home", home, "adapters", "rollback", "m@3"]) == 2
    assert "give NAME@ALIAS" in capsys.readouterr().err


KILLER = """
import os, signal, sys
from loradock.registry import Registry
steps, kill_at = [0], int(sys.argv[2])
def counted(real):
    def step(*a, **k):
        steps[0] += 1
        if steps[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)
    return step
os.replace, os.fsync, os.unlink = counted(os.replace), counted(os.fsync), counted(os.unlink)
registry = Registry(sys.argv[1])
registry.rollback("m", "prod") if sys.argv[3] == "rollback" else registry.tag("m@3", "prod")
print("steps", steps[0])
"""


@pytest.mark.parametrize("operation", ["tag", "rollback"])
def test_sigkill_at_every_write_step_leaves_a_truthful_history(three: Registry, tmp_path: Path, operation):
    """A move killed before, between or after its writes: the alias points at the old or the
    new target, the history's last entry is applied exactly when the alias moved, and the next
    move and rollback work."""
    three.tag("m@2", "prod")  # prod: 1 -> 2, so a rollback has somewhere to go
    template = tmp_path / "template"
    shutil.copytree(three.root, template, symlinks=True)
    old, new = 2, (1 if operation == "rollback" else 3)
    outcomes = set()
    for kill_at in range(1, 50):
        root = tmp_path / f"kill{kill_at}"
        shutil.copytree(template, root, symlinks=True)
        done = subprocess.run([sys.executable, "-c", KILLER, str(root), str(kill_at), operation],
                              capture_output=True, text=True, timeout=60)
        registry = Registry(root)
        now = registry.aliases("m")["prod"]
        changes = registry.alias_history("m", "prod")["prod"]
        assert now in (old, new), (kill_at, now)
        moved = changes[-1].after == new and changes[-1].before == old
        assert changes[-1].applied == (changes[-1].after == now), (kill_at, changes)
        assert all(c.applied for c in changes[:-1])
        outcomes.add((now, moved))
        # the registry stays usable: the next move drops an entry that never took effect
        registry.tag("m@3", "prod", reason="after the crash")
        assert registry.rollback("m", "prod").version == now
        if done.returncode == 0:  # the move ran to its end: no step left to kill
            assert now == new
            break
        assert done.returncode == -signal.SIGKILL, done.stderr
    else:
        pytest.fail("the move never completed")
    assert outcomes >= {(old, False), (old, True), (new, True)}  # before, between and after the writes
    assert os.path.isdir(root)


def test_a_canary_splits_traffic_by_route_key_and_rolls_back(three: Registry):
    """`tag m@3 prod --weight 10`: a tenth of prod's traffic to 3, the rest on its stable 1; one
    route key always lands on one version; displays show the stable version; rollback restores
    the plain alias; the canary's version cannot be deleted from under it."""
    three.tag("m@3", "prod", weight=10, reason="canary")
    assert three.alias_targets("m")["prod"] == {1: 90, 3: 10}
    assert three.aliases("m")["prod"] == 1 and three.resolve("m@prod").version == 1  # unrouted: stable
    text = (three.root / "adapters" / "m" / "aliases" / "prod").read_text()
    assert not text.strip().isdigit()  # what a reader older than canaries requires: it ignores the alias
    routed = [three.route("m@prod", f"user-{i}") for i in range(1000)]
    share = routed.count("m@3") / len(routed)
    assert set(routed) == {"m@1", "m@3"} and 0.07 <= share <= 0.13, share
    assert {three.route("m@prod", "user-7") for _ in range(20)} == {routed[7]}
    unkeyed = [three.route("m@prod", None) for _ in range(1000)].count("m@3") / 1000
    assert 0.07 <= unkeyed <= 0.13, unkeyed
    assert three.route("m@2", "user-1") == "m@2" and three.route("m", "user-1") == "m"
    with pytest.raises(RegistryError, match="m@3 is what alias"):
        three.delete("m@3")
    three.tag("m@2", "prod", weight=20)  # a new canary replaces the previous one
    assert three.alias_targets("m")["prod"] == {1: 80, 2: 20}
    assert three.rollback("m", "prod").version == 1
    assert three.alias_targets("m")["prod"] == {1: 90, 3: 10}
    three.rollback("m", "prod", reason="canary failed")
    assert three.alias_targets("m")["prod"] == {1: 100}
    changes = three.alias_history("m", "prod")["prod"]
    assert [(c.action, c.after) for c in changes][1:] == [
        ("tag", {"1": 90, "3": 10}), ("tag", {"1": 80, "2": 20}), ("rollback", {"1": 90, "3": 10}), ("rollback", 1)]
    with pytest.raises(RegistryError, match="already the alias's stable target"):
        three.tag("m@1", "prod", weight=5)
    with pytest.raises(RegistryError, match="a canary needs the alias to point"):
        three.tag("m@2", "beta", weight=5)
