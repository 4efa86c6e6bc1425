"""Registry test fixtures: real PEFT adapters made once per session on the tiny base."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from loradock.registry import BaseInfo

from tests.adapters import make_lora_adapter


@pytest.fixture(scope="session")
def lora_dir(tiny_base: BaseInfo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rank-8 q/v LoRA for the tiny base (treat as read-only: publish copies it)."""
    return make_lora_adapter(tiny_base.path, tmp_path_factory.mktemp("lora") / "a", seed=1)


@pytest.fixture(scope="session")
def lora_dir_2(tiny_base: BaseInfo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, different adapter (rank 4, attention + MLP targets)."""
    return make_lora_adapter(
        tiny_base.path, tmp_path_factory.mktemp("lora") / "b", rank=4, alpha=8,
        targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), seed=2,
    )


@pytest.fixture
def editable_lora(lora_dir: Path, tmp_path: Path) -> Path:
    """A private copy of `lora_dir` that a test may break."""
    import shutil

    return Path(shutil.copytree(lora_dir, tmp_path / "editable"))


# ----- Hub servers on loopback: olah for downloads, tests/registry/hub_server.py for uploads

def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Olah:
    endpoint: str
    mirrors: Path  # holds models/<org>/<name>/.git repos that olah serves


@pytest.fixture(scope="module")
def olah(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Olah]:
    """olah in offline mode serving plain git repos from `mirrors`; its upstream is a dead loopback port."""
    root = tmp_path_factory.mktemp("olah")
    mirrors = root / "mirrors"
    (mirrors / "models").mkdir(parents=True)
    port, dead_port = free_port(), free_port()
    config = root / "olah.toml"
    config.write_text(
        "[basic]\n"
        f'host = "127.0.0.1"\nport = {port}\n'
        f'repos-path = "{root / "cache"}"\nmirrors-path = ["{mirrors}"]\n'
        f'hf-scheme = "http"\nhf-netloc = "127.0.0.1:{dead_port}"\nhf-lfs-netloc = "127.0.0.1:{dead_port}"\n'
        "metadata-cache-ttl = 0\n"
        "[accessibility]\noffline = true\n"
    )
    log = (root / "olah.out").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from olah.server import cli; sys.exit(cli())",
         "-c", str(config), "--log-path", str(root / "logs")],
        cwd=root, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"olah exited with {proc.returncode}:\n{(root / 'olah.out').read_text()}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                pytest.fail("olah did not start listening within 60 s")
            time.sleep(0.2)
        yield Olah(f"http://127.0.0.1:{port}", mirrors)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
def hub_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[[str], None]:
    """Point huggingface_hub at an endpoint, online, without telemetry, its cache in tmp."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read once at import
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    monkeypatch.delenv("HF_TOKEN", raising=False)

    def use(endpoint: str) -> None:
        monkeypatch.setenv("HF_ENDPOINT", endpoint)

    return use
