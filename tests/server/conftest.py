"""Server test fixtures: real adapters on the tiny base, a registry per module, and real
`loradock serve` subprocesses on free ports.

Servers run the tiny random Llama with quantize "none" so they start in seconds; the
adapters are real PEFT LoRA adapters published into the module's registry.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from loradock.registry import BaseInfo, Registry

from tests.adapters import make_lora_adapter
from tests.conftest import TINY_BASE

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Flags shared by every test server: tiny base, full precision, alias moves noticed fast.
SERVER_FLAGS = ("--base", TINY_BASE, "--port", "0", "--quantize", "none", "--device", "cpu",
                "--max-rank", "16", "--max-slots", "2", "--registry-poll-s", "0.05")
STARTUP_TIMEOUT_S = 180.0


@pytest.fixture(scope="session")
def adapter_dirs(tiny_base: BaseInfo, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Source directories of real PEFT adapters for the tiny base (read-only: publish copies)."""
    root = tmp_path_factory.mktemp("server-adapters")
    specs = {
        "alpha": dict(rank=8, targets=("q_proj", "v_proj"), seed=1),
        "beta1": dict(rank=16, targets=ALL_LINEAR, seed=2),
        "beta2": dict(rank=4, targets=ALL_LINEAR, seed=3),
        "gamma": dict(rank=4, targets=("q_proj", "k_proj", "v_proj", "o_proj"), seed=4, use_rslora=True),
        "big": dict(rank=32, targets=("q_proj",), seed=5),  # above the servers' --max-rank 16
    }
    return {name: make_lora_adapter(tiny_base.path, root / name, **spec) for name, spec in specs.items()}


def make_home(root: Path, session_home: Path, adapter_dirs: dict[str, Path]) -> Path:
    """A registry root sharing the session's bases, holding:
    alpha@1 (prod), beta@1 (prod) and beta@2, gamma@1, big@1 (rank 32) and broken@1 (tampered)."""
    root.mkdir(parents=True)
    os.symlink(session_home / "bases", root / "bases")
    registry = Registry(root)
    registry.publish(adapter_dirs["alpha"], "alpha", base=TINY_BASE, aliases=["prod"])
    registry.publish(adapter_dirs["beta1"], "beta", base=TINY_BASE, aliases=["prod"])
    registry.publish(adapter_dirs["beta2"], "beta", base=TINY_BASE)
    registry.publish(adapter_dirs["gamma"], "gamma", base=TINY_BASE)
    registry.publish(adapter_dirs["big"], "big", base=TINY_BASE)
    broken = registry.publish(adapter_dirs["alpha"], "broken", base=TINY_BASE)
    weights = broken.path / "adapter_model.safetensors"
    weights.chmod(0o644)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte in the tensor data
    weights.write_bytes(bytes(data))
    return root


@pytest.fixture(scope="module")
def server_home(tiny_base: BaseInfo, session_home: Path, adapter_dirs: dict[str, Path],
                tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_home(tmp_path_factory.mktemp("server-home") / "home", session_home, adapter_dirs)


@dataclass
class ServerProcess:
    """A `loradock serve` subprocess; its combined output goes to `log_path`."""

    proc: subprocess.Popen
    log_path: Path
    address: str
    metrics_url: str | None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait for the exit status (kill after `timeout`)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"server did not exit {timeout} s after SIGTERM; log:\n{self.log()}") from None


def start_server(home: Path, log_path: Path, *flags: str, prefix: tuple[str, ...] = ()) -> ServerProcess:
    """Start `loradock serve` on a free port and wait for "serving on HOST:PORT". `prefix` wraps the
    command (e.g. a shell that mounts something first and then execs the rest)."""
    cmd = [*prefix, sys.executable, "-m", "loradock.cli", "--home", str(home), "serve", *SERVER_FLAGS, *flags]
    log_file = log_path.open("w")
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log_file.close()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        serving = re.search(r"serving on ([\d.]+):(\d+)", text)
        if serving:
            metrics = re.search(r"metrics on (http://\S+/metrics)", text)
            return ServerProcess(proc, log_path, f"{serving[1]}:{serving[2]}", metrics[1] if metrics else None)
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode} before serving; log:\n{text}")
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    raise AssertionError(f"server not serving after {STARTUP_TIMEOUT_S} s; log:\n{log_path.read_text()}")


@pytest.fixture(scope="module")
def server(server_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The module's plaintext, no-auth server with a metrics endpoint."""
    proc = start_server(server_home, tmp_path_factory.mktemp("server-log") / "serve.log", "--metrics-port", "0")
    yield proc
    assert proc.terminate() == 0, proc.log()


def cli(*args: str, stdin: str | None = None, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run `python -m loradock.cli ARGS` and capture its output."""
    return subprocess.run([sys.executable, "-m", "loradock.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout)
