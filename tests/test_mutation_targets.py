"""`make mutation` stays runnable: every breakage in tests/mutation.py still patches code that
exists (its file, its `old` text exactly once) and names tests that exist. A refactor that
moves the patched text fails here, in the normal suite, instead of when `make mutation` runs."""

from __future__ import annotations

from pathlib import Path

from tests.mutation import BREAKAGES, Breakage, stale


def test_every_breakage_still_applies_to_the_tree():
    assert stale(BREAKAGES) == []
    names = [b.name for b in BREAKAGES]
    assert len(names) == len(set(names)), "breakage names are unique (they are selected by name)"


def test_a_stale_breakage_is_named(tmp_path: Path):
    """The check itself: moved text, a vanished file and a missing test are each reported."""
    (tmp_path / "code.py").write_text("x = 1\nx = 1\n")
    (tmp_path / "test_code.py").write_text("def test_x():\n    pass\n")
    ok = Breakage("ok", "test_code.py", "pass\n", "1 / 0\n", ("test_code.py::test_x", "-k", "gone.py"))
    assert stale([ok], tmp_path) == []
    assert stale([
        Breakage("twice", "code.py", "x = 1\n", "x = 2\n", ("test_code.py",)),
        Breakage("moved", "code.py", "y = 1\n", "y = 2\n", ("test_code.py",)),
        Breakage("gone", "gone.py", "x", "y", ("test_code.py",)),
        Breakage("no-test", "test_code.py", "pass\n", "1 / 0\n", ("test_code.py::test_y", "tests/nope.py")),
    ], tmp_path) == [
        "twice (code.py: the old text occurs 2 times)",
        "moved (code.py: the old text occurs 0 times)",
        "gone (gone.py: no such file)",
        "no-test (test test_code.py::test_y: no such test)",
        "no-test (test path tests/nope.py: does not exist)",
    ]
