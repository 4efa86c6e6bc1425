"""`loradock serve|generate|chat` flags: generated from EngineConfig, validated with clear errors."""

from __future__ import annotations

import dataclasses

import pytest
from loradock.runtime.config import EngineConfig

from loradock.cli import build_parser, main
from loradock.commands.serve import byte_size


def test_every_engine_field_is_a_serve_flag_with_its_docstring():
    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]  # argparse keeps subparsers here
    flags = {a.dest: a for a in serve._actions}
    docs = EngineConfig.field_docs()
    for field in dataclasses.fields(EngineConfig):
        if field.name == "base":
            continue
        assert f"--{field.name.replace('_', '-')}" in flags[field.name].option_strings
        assert flags[field.name].default == field.default
        assert docs[field.name] and docs[field.name] in flags[field.name].help


def test_serve_parses_sizes_and_choices():
    args = build_parser().parse_args(["serve", "--host-cache-bytes", "512MiB", "--max-slots", "3",
                                      "--quantize", "none", "--port", "0"])
    assert (args.host_cache_bytes, args.max_slots, args.quantize, args.port) == (512 * 1024**2, 3, "none", 0)
    assert byte_size("2GiB") == 2 * 1024**3 and byte_size("1.5kb") == 1500
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--quantize", "fp3"])


def test_serve_offers_every_lora_op():
    from loradock.runtime.lora_ops import LORA_OPS

    for name in LORA_OPS:
        assert build_parser().parse_args(["serve", "--lora-ops", name]).lora_ops == name


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["serve", "--base", "nosuch"], "nosuch"),
        (["serve", "--base", "tiny-llama", "--max-slots", "0"], "max_slots"),
        (["serve", "--base", "tiny-llama", "--tls-cert", "c.pem"], "--tls-key"),
        (["serve", "--base", "tiny-llama", "--auth-token-file", "/nonexistent/token"], "token file"),
        (["serve", "--base", "tiny-llama", "--no-grpc"], "--http-port"),
        (["serve", "--base", "tiny-llama", "--allow-adapter-updates"], "--http-port"),
    ],
)
def test_bad_serve_options_exit_2_naming_the_problem(tiny_base, home, capsys, argv, words):
    assert main(["--home", str(home), *argv]) == 2
    assert words in capsys.readouterr().err


def test_generate_without_a_server_is_a_clear_error(capsys):
    argv = ["generate", "--server", "127.0.0.1:1", "--timeout", "5", "hello"]
    assert main(argv) == 2
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_busy_port_and_missing_tls_files_are_clear_errors(tiny_base, home, tmp_path, capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        argv = ["--home", str(home), "serve", "--base", "tiny-llama", "--quantize", "none", "--port", port]
        assert main(argv) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err

    with socket.socket() as busy:  # the HTTP port too, before the base is loaded
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        argv = ["--home", str(home), "serve", "--base", "tiny-llama", "--quantize", "none", "--port", "0",
                "--http-port", port]
        assert main(argv) == 2
    assert f"cannot listen on 127.0.0.1:{port} for HTTP" in capsys.readouterr().err

    argv = ["--home", str(home), "serve", "--base", "tiny-llama", "--quantize", "none", "--port", "0",
            "--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem")]
    assert main(argv) == 2
    assert "cert.pem does not exist" in capsys.readouterr().err


def test_cuda_without_a_gpu_is_a_clear_error(tiny_base, home, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    argv = ["--home", str(home), "serve", "--base", "tiny-llama", "--port", "0", "--device", "cuda"]
    assert main(argv) == 2
    assert "cannot start the engine" in capsys.readouterr().err
