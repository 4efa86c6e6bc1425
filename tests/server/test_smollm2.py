"""The real thing: SmolLM2-135M-Instruct in 4-bit NF4 behind `loradock serve`, asked through the CLI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from loradock.registry import BaseInfo

from tests.server.conftest import cli, start_server


@pytest.mark.slow
def test_smollm2_nf4_server_answers_a_chat_question(smollm2_base: BaseInfo, session_home: Path, tmp_path: Path):
    home = tmp_path / "home"
    home.mkdir()
    os.symlink(session_home / "bases", home / "bases")
    server = start_server(home, tmp_path / "serve.log", "--base", smollm2_base.name, "--quantize", "nf4")
    try:
        done = cli("generate", "--server", server.address, "--chat", "--max-new-tokens", "8",
                   "What is the capital of France?", timeout=120)
        assert done.returncode == 0, done.stderr
        assert "Paris" in done.stdout
        assert done.stderr.startswith("[base |")
    finally:
        assert server.terminate() == 0, server.log()
