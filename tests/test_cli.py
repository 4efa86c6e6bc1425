"""The CLI surface: the command list is pinned, and every command and action has complete help."""

from __future__ import annotations

import argparse

import pytest

from loradock.cli import build_parser

COMMANDS = ["bases", "adapters", "train", "export", "serve", "ui", "generate", "chat", "demo", "bench", "cluster"]


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


def all_parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    found, todo = [], [("loradock", build_parser())]
    while todo:
        name, parser = todo.pop()
        found.append((name, parser))
        todo += [(f"{name} {sub}", p) for sub, p in subcommands(parser).items()]
    return found


def test_command_list_is_pinned():
    assert list(subcommands(build_parser())) == COMMANDS


@pytest.mark.parametrize(("name", "parser"), all_parsers(), ids=lambda x: x if isinstance(x, str) else "")
def test_every_option_and_command_is_described(name, parser):
    assert parser.description or name == "loradock", f"`{name}` has no description"
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            assert all(c.help for c in action._choices_actions), f"`{name}` has an undocumented action"
            continue
        assert action.help, f"`{name}` option {action.option_strings or action.dest} has no help"


def test_help_exits_cleanly(capsys):
    for name, parser in all_parsers():
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(["--help"])
        assert exit_info.value.code == 0, name
        assert "usage:" in capsys.readouterr().out


def test_a_read_only_registry_is_an_error_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    """Guards against raw OSError tracebacks when the registry is mounted read-only."""
    import errno

    from loradock.registry import Registry

    from loradock import cli

    def read_only(*_args, **_kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "adapters" / ".staging"))

    monkeypatch.setattr(Registry, "sign", read_only)
    code = cli.main(["--home", str(tmp_path), "adapters", "sign", "x@1", "--key", str(tmp_path / "k.pem")])
    err = capsys.readouterr().err
    assert code == 2
    assert "error: cannot write" in err and ".staging" in err and "Read-only file system" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", [["serve", "--http-port", "0"], ["cluster", "serve", "--http-port", "0"]])
def test_serve_and_cluster_serve_pick_the_base_alike(tmp_path, capsys, command, tiny_base):
    """Without --base both take the registry's only base; with none or several they say what to
    do, before anything loads (neither a model nor Ray is started here)."""
    from loradock.registry import Registry

    from loradock import cli
    from loradock.bases import import_base

    assert cli.main(["--home", str(tmp_path), *command]) == 2
    assert "the registry has no base model; run `loradock bases add` first" in capsys.readouterr().err
    for name in ("one", "two"):
        import_base(Registry(tmp_path), tiny_base.path, name=name)
    assert cli.main(["--home", str(tmp_path), *command]) == 2
    assert "the registry has several bases (one, two); choose one with --base" in capsys.readouterr().err
