"""`loradock bench` flags: defaults, --quick overrides, and clear errors for bad input."""

from __future__ import annotations

import pytest
from loradock.benchmarks.run import BenchConfig

from loradock.cli import build_parser, main
from loradock.commands.bench import bench_config


def config_of(*argv: str) -> BenchConfig:
    return bench_config(build_parser().parse_args(["bench", *argv]))


def test_defaults_follow_the_design():
    c = config_of()
    assert (c.base, c.adapters, c.quantize, c.max_running, c.headline) == ("smollm2-135m-instruct", [32], "nf4", 32, 32)
    assert (c.prompt_len, c.output_len, c.rate, c.registry_versions) == ((16, 128), (16, 64), None, 10_000)
    assert set(c.systems) == {"loradock", "loradock-grpc", "loradock-http", "peft-static", "peft-naive",
                              "base-only"}


def test_quick_is_small_and_flags_override_it():
    q = config_of("--quick")
    assert q.name == "quick" and q.requests <= 12 and q.registry_versions <= 200
    o = config_of("--quick", "--adapters", "4", "16", "--rate", "2.5", "--systems", "loradock", "base-only")
    assert (o.adapters, o.rate, o.systems, o.headline) == ([4, 16], 2.5, ("loradock", "base-only"), 16)
    assert o.requests == q.requests
    assert config_of("--quick", "--adapters", "8", "32", "128").headline == 32


@pytest.mark.parametrize(("argv", "message"), [
    (["--systems", "vllm"], "unknown systems ['vllm']"),
    (["--adapters", "0"], "--adapters needs one or more counts >= 1"),
    (["--threads", "0"], "threads must be positive"),
])
def test_bad_flags_are_user_errors(argv, message, capsys):
    assert main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err


def test_unknown_base_is_refused_before_any_work(home, tmp_path, capsys):
    bench_home = tmp_path / "bench"
    assert main(["bench", "--base", "no-such-base", "--bench-home", str(bench_home),
                 "--out-dir", str(tmp_path / "out")]) == 2
    assert "base 'no-such-base' is in neither" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = capsys.readouterr().out
    for flag in ("--quick", "--json", "--base", "--adapters", "--clients", "--rate", "--max-running",
                 "--systems", "--threads", "--registry-versions", "--bench-home", "--out-dir"):
        assert flag in text
