"""`loradock demo --quick` end to end on the tiny base: real trainer, real `loradock serve`
subprocess, real gRPC requests; asserts the serving and the live alias move, not accuracy."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from loradock.registry import Registry
from loradock.trainer import load_config

from loradock.cli import main
from loradock.demo import DOMAINS as DEMO_DOMAINS
from loradock.demo import EXAMPLES_DIR, QUICK, UPDATE, find_reusable, train_overrides

DOMAINS = ("veloria", "quillfeather")
DOMAINS_BY_NAME = {d.adapter: d for d in DEMO_DOMAINS}


def run_quick_demo(home: Path, base: str, out: Path) -> dict:
    assert main(["demo", "--home", str(home), "--base", base, "--quick", "--json", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, session_home, tiny_base):
    """One quick demo in a fresh registry that shares the session's bases."""
    home = tmp_path_factory.mktemp("demo-home")
    (home / "bases").symlink_to(session_home / "bases")
    started = time.time()
    outcome = run_quick_demo(home, tiny_base.name, home / "outcome.json")
    outcome["test_window"] = (started, time.time())  # when the demo (and its server) ran
    return home, outcome


def test_both_domains_are_served_by_their_own_adapter_next_to_the_base(first_run):
    _, outcome = first_run
    for domain in DOMAINS:
        result = outcome["domains"][domain]
        assert result["adapter"] == f"{domain}@1" and not result["reused"]
        assert result["heldout"] == 3
        answers = [a for a in outcome["answers"] if a["domain"] == domain]
        # every question went to the adapter (served by exactly that version) and to the base
        assert sorted(a["served"] for a in answers) == ["base"] * 3 + [f"{domain}@1"] * 3
        assert all(a["text"] for a in answers)


def test_requests_were_interleaved_across_domains_and_the_base(first_run):
    _, outcome = first_run
    served = [a["served"] for a in outcome["answers"]]
    assert served[:4] == ["veloria@1", "base", "quillfeather@1", "base"]


def test_alias_move_is_served_by_the_same_server_process(first_run):
    home, outcome = first_run
    move = outcome["alias_move"]
    assert move["before"] == "quillfeather@1"
    assert move["after"] == move["served_after"] == "quillfeather@2"
    # The server's own GetInfo answers name the child the demo started (not this process),
    # started during this run, and unchanged by the move: not a value the demo recorded itself.
    assert move["pid_before"] == move["pid_after"] == move["server_pid"] != os.getpid()
    assert move["start_time_before"] == move["start_time_after"]
    start, end = outcome["test_window"]
    assert start - 1 <= move["start_time_before"] <= end
    assert move["server_alive"] and move["served_without_restart"]
    assert outcome["server_exit_code"] == 0  # SIGTERM drained cleanly

    registry = Registry(home)
    assert registry.aliases("quillfeather") == {"prod": 2}
    assert registry.aliases("veloria") == {"prod": 1}
    assert registry.resolve("quillfeather@2").manifest["parent"] == "quillfeather@1"
    assert (home / "logs" / "server.log").is_file()


def test_a_second_run_would_reuse_exactly_the_matching_versions(first_run, tiny_base):
    home, _ = first_run
    registry = Registry(home)
    config = load_config(EXAMPLES_DIR / "veloria.yaml", train_overrides(DOMAINS_BY_NAME["veloria"], tiny_base, home, QUICK))
    assert find_reusable(registry, config, tiny_base).ref == "veloria@1"
    # anything that changes what is learned (a hyperparameter, the data) means training again
    assert find_reusable(registry, load_config(config.to_dict(), {"learning_rate": 1e-4}), tiny_base) is None
    assert find_reusable(registry, load_config(config.to_dict(), {"max_samples": 50}), tiny_base) is None
    # where the run writes does not matter
    assert find_reusable(registry, load_config(config.to_dict(), {"output_dir": str(home / "x")}), tiny_base).ref == "veloria@1"
    # the second version matches only while its parent (prod's target when trained) is the same
    update = load_config(EXAMPLES_DIR / UPDATE.config, train_overrides(UPDATE, tiny_base, home, QUICK))
    assert registry.aliases("quillfeather")["prod"] == 2
    assert find_reusable(registry, update, tiny_base) is None  # prod -> @2 now, @2's parent is @1
    registry.tag("quillfeather@1", "prod")
    try:
        assert find_reusable(registry, update, tiny_base).ref == "quillfeather@2"
    finally:
        registry.tag("quillfeather@2", "prod")


def test_an_unknown_base_is_refused_before_anything_is_trained(home, capsys):
    assert main(["demo", "--home", str(home), "--base", "no-such-base", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "base 'no-such-base' is not in" in err and "bases add" in err
    assert not (home / "adapters").exists() or not any((home / "adapters").iterdir())
