"""The demo's small parts without a model: held-out files and scoring, request order,
choosing the registry folder, a server child that fails to start, and the restart check."""

from __future__ import annotations

import argparse
import os
import sys
import time
from types import SimpleNamespace

import psutil
import pytest
from loradock.runtime.server import catalog, convert
from loradock.runtime.types import EngineInfo

from loradock import demo
from loradock.commands.demo import MARKER, choose_home, fresh_home
from loradock.demo import DOMAINS, EXAMPLES_DIR, QUICK, UPDATE, changed_question, interleaved_jobs
from loradock.errors import UserError
from loradock.heldout import HeldOutQuestion, accuracy, answer_matches, load_heldout
from loradock.server_process import ServerProcess, ServerStartError, log_tail


def test_shipped_heldout_files_load_and_differ_only_in_the_changed_price():
    for domain in (*DOMAINS, UPDATE):
        assert len(load_heldout(EXAMPLES_DIR / "data" / domain.heldout)) == 20
    old, new = changed_question(DOMAINS[1], UPDATE)
    assert old.question == new.question and "Mopwright 3" in old.question
    assert (old.expected, new.expected) == ("$1,385", "$1,199")


def test_heldout_errors_name_every_bad_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "Q?", "expected": "A"}\nnot json\n\n{"question": "Q2?"}\n')
    with pytest.raises(UserError) as e:
        load_heldout(path)
    assert f"{path}:2: not valid JSON" in str(e.value)
    assert f"{path}:4: missing or empty expected" in str(e.value)
    with pytest.raises(UserError, match="not found"):
        load_heldout(tmp_path / "missing.jsonl")


@pytest.mark.parametrize(
    ("answer", "expected", "ok"),
    [
        ("The Mopwright 3 costs $1,199.", "$1,199", True),
        ("It costs $1199 now", "$1,199", True),  # thousands separators do not matter
        ("The capital of Ostrana is KELVARIS.", "Kelvaris", True),
        ("The Mopwright 3 costs $1,385.", "$1,199", False),
        ("I do not know.", "Kelvaris", False),
    ],
)
def test_answer_matches(answer, expected, ok):
    assert answer_matches(answer, expected) is ok


def test_accuracy():
    assert accuracy([True, False, True, True]) == 0.75
    assert accuracy([]) == 0.0


def test_jobs_alternate_domains_and_base():
    qs = {name: [HeldOutQuestion(f"{name} {i}?", "x") for i in range(n)]
          for name, n in (("a", 2), ("b", 1))}
    jobs = [(d, q.question, ref) for d, q, ref in interleaved_jobs(qs)]
    assert jobs == [
        ("a", "a 0?", "a@prod"), ("a", "a 0?", ""),
        ("b", "b 0?", "b@prod"), ("b", "b 0?", ""),
        ("a", "a 1?", "a@prod"), ("a", "a 1?", ""),
    ]


def args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"demo_home": None, "home": None, "reuse": False, **kw})


def test_fresh_home_replaces_only_a_folder_the_demo_made(tmp_path):
    mine = fresh_home(tmp_path / "demo")
    (mine / "adapters").mkdir()
    assert fresh_home(mine) == mine and not (mine / "adapters").exists()
    assert (mine / MARKER).is_file()

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "precious.txt").write_text("keep me")
    with pytest.raises(UserError, match="was not created by `loradock demo`"):
        fresh_home(theirs)
    assert (theirs / "precious.txt").read_text() == "keep me"


def test_home_and_global_home_are_kept(tmp_path):
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "adapters").mkdir()
    assert choose_home(args(demo_home=str(kept))) == kept
    assert choose_home(args(home=str(kept))) == kept
    assert (kept / "adapters").is_dir()


def test_server_that_exits_early_is_reported_with_its_log(tmp_path):
    log = tmp_path / "server.log"
    server = ServerProcess(tmp_path, "no-such-base", log_path=log, is_serving=lambda _: False,
                           ready_timeout_s=120)
    # The real command line with a base that does not exist: serve refuses it and exits 2.
    with pytest.raises(ServerStartError) as e:
        server.start()
    message = str(e.value)
    assert "exited with code 2 before it was ready" in message
    assert "no-such-base" in message and str(log) in message
    assert not server.alive()


def test_server_that_never_becomes_healthy_is_stopped(tmp_path, monkeypatch):
    server = ServerProcess(tmp_path, "x", log_path=tmp_path / "s.log", is_serving=lambda _: False,
                           ready_timeout_s=1)
    # Stand in for `loradock serve` with a process that runs but never answers health checks.
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    monkeypatch.setattr(ServerProcess, "command", property(lambda self: sleeper))
    with pytest.raises(ServerStartError, match="not SERVING after 1 s"):
        server.start()
    assert not server.alive()


def test_log_tail_keeps_the_last_state_of_progress_lines(tmp_path):
    path = tmp_path / "log"
    path.write_text("a\nloading 10%\rloading 100%\nb\n")
    assert log_tail(path, lines=2) == "loading 100%\nb"
    assert log_tail(tmp_path / "none") == ""


# ---- the restart check of step 6 ----------------------------------------------------------


def test_get_info_reports_the_serving_process_from_the_process_table():
    """Guards GetInfo's pid/start_time going missing (0) or not surviving the wire."""
    described = EngineInfo("b", "f" * 64, "none", "cpu", "float32", "float32", *range(1, 11), "reference", "hermes", 49152, "sdpa")
    engine = SimpleNamespace(info=lambda: described)
    info = convert.info_from_proto(convert.info_to_proto(catalog.server_info(engine)))
    assert info.pid == os.getpid()
    assert info.start_time == psutil.Process().create_time() < time.time()


class FakeServer(SimpleNamespace):
    """What move_alias_live reads from ServerProcess: the pid the demo recorded at start."""

    pid = 4242

    def alive(self) -> bool:
        return True


class FakeRegistry(SimpleNamespace):
    moved = False

    def tag(self, ref: str, alias: str) -> None:
        self.moved = True


def run_move(monkeypatch, infos: list[SimpleNamespace]) -> demo.AliasMove:
    """move_alias_live against fakes: GetInfo answers `infos` in turn; no training, no model."""
    registry = FakeRegistry()
    version = SimpleNamespace(ref=f"{UPDATE.adapter}@2")
    monkeypatch.setattr(demo, "train_or_reuse", lambda *a: (version, False))

    def ask(client, domain, question, ref, max_new_tokens) -> demo.Answer:
        served = version.ref if registry.moved else f"{UPDATE.adapter}@1"
        return demo.Answer(domain, question, ref, "text", served, True, 0.0)

    monkeypatch.setattr(demo, "ask", ask)
    answers = iter(infos)
    client = SimpleNamespace(info=lambda: next(answers))
    return demo.move_alias_live(client, registry, FakeServer(), None, None, QUICK)


START = 1_700_000_000.25


@pytest.mark.parametrize(
    ("after", "same_process"),
    [
        (SimpleNamespace(pid=4242, start_time=START), True),
        (SimpleNamespace(pid=5151, start_time=START + 9), False),  # restarted as a new process
        (SimpleNamespace(pid=4242, start_time=START + 9), False),  # restarted, and the pid reused
    ],
    ids=["same", "new-pid", "reused-pid"],
)
def test_restart_check_uses_the_servers_own_get_info_answers(monkeypatch, after, same_process):
    """Guards the demo judging "no restart" from its own record (ServerProcess.pid, unchanged
    here whatever happened) instead of what the server reports before and after the move."""
    move = run_move(monkeypatch, [SimpleNamespace(pid=4242, start_time=START), after])
    assert move.served_after == move.after == f"{UPDATE.adapter}@2"
    assert (move.pid_before, move.pid_after) == (4242, after.pid)
    assert (move.start_time_before, move.start_time_after) == (START, after.start_time)
    assert move.served_without_restart is same_process


def test_restart_check_needs_the_process_the_demo_started(monkeypatch):
    """Guards trusting a GetInfo answer from some other server (a stale one on the port)."""
    other = SimpleNamespace(pid=777, start_time=START)
    assert not run_move(monkeypatch, [other, other]).served_without_restart
