"""HTTP edge fixtures: real `loradock serve` processes with the OpenAI-compatible API on free
ports of 127.0.0.1, real adapters on the tiny base, and the official `openai` client.

Two servers per session:
- `api`: gRPC and HTTP from one engine, a bearer token, runtime adapter updates on; 8 adapters
  (a0..a7) plus `mover` (two versions, alias prod), `big` (rank above --max-rank) and `broken`
  (tampered weights).
- `tight`: HTTP only, one running sequence and a queue of one (429), no token, no updates
  (403); its start is watched so the "loading" 503 is seen, and the last test drains it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest
from loradock.registry import BaseInfo, Registry

from tests.adapters import make_lora_adapter
from tests.conftest import TINY_BASE

TOKEN = "http-test-token"
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTERS = [f"a{i}" for i in range(8)]
COMMON = ("--base", TINY_BASE, "--quantize", "none", "--device", "cpu", "--max-rank", "16",
          "--registry-poll-s", "0.05", "--http-port", "0")
STARTUP_TIMEOUT_S = 180.0


@pytest.fixture(scope="session")
def http_adapter_dirs(tiny_base: BaseInfo, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Distinct real PEFT adapters (ranks 4/8/16, attention-only and all linears)."""
    root = tmp_path_factory.mktemp("http-adapters")
    dirs = {}
    for i, name in enumerate(ADAPTERS):
        targets = ALL_LINEAR if i % 2 else ("q_proj", "v_proj")
        dirs[name] = make_lora_adapter(tiny_base.path, root / name, rank=(4, 8, 16)[i % 3], targets=targets,
                                       seed=100 + i)
    dirs["mover2"] = make_lora_adapter(tiny_base.path, root / "mover2", rank=8, targets=ALL_LINEAR, seed=200)
    dirs["big"] = make_lora_adapter(tiny_base.path, root / "big", rank=32, targets=("q_proj",), seed=201)
    return dirs


@pytest.fixture(scope="session")
def http_home(session_home: Path, http_adapter_dirs: dict[str, Path],
              tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("http-home") / "home"
    root.mkdir()
    os.symlink(session_home / "bases", root / "bases")
    registry = Registry(root)
    for name in ADAPTERS:
        registry.publish(http_adapter_dirs[name], name, base=TINY_BASE)
    registry.publish(http_adapter_dirs["a0"], "mover", base=TINY_BASE, aliases=["prod"])
    registry.publish(http_adapter_dirs["mover2"], "mover", base=TINY_BASE)
    registry.publish(http_adapter_dirs["big"], "big", base=TINY_BASE)
    broken = registry.publish(http_adapter_dirs["a1"], "broken", base=TINY_BASE)
    weights = broken.path / "adapter_model.safetensors"
    weights.chmod(0o644)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte: the digest check refuses it when the engine loads it
    weights.write_bytes(bytes(data))
    return root


@dataclass
class Served:
    """A `loradock serve` child: its HTTP base URL, gRPC address (if any) and log."""

    proc: subprocess.Popen
    log_path: Path
    url: str
    grpc: str | None
    early: list[httpx.Response] = field(default_factory=list)  # answers seen while it was loading

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"server ignored SIGTERM for {timeout} s; log:\n{self.log()}") from None

    def metrics(self) -> dict[str, float]:
        """Every sample of GET /metrics on the HTTP port."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line and not line.startswith("#")}


def start(home: Path, log_path: Path, *flags: str, probe_loading: bool = False) -> Served:
    """Start `loradock serve` and wait for "serving HTTP on URL". With `probe_loading`, call
    the API as soon as the port is bound and keep what it answered before the engine was warm."""
    cmd = [sys.executable, "-m", "loradock.cli", "--home", str(home), "serve", *COMMON, *flags]
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    early: list[httpx.Response] = []
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        serving = re.search(r"serving HTTP on (http://\S+)", text)
        if serving:
            grpc = re.search(r"serving on ([\d.]+:\d+)", text)
            return Served(proc, log_path, serving[1], grpc[1] if grpc else None, early)
        bound = re.search(r"HTTP API on (http://\S+)", text)
        if probe_loading and bound and len(early) < 2:
            early.append(httpx.get(f"{bound[1]}/ready", timeout=10))
            early.append(httpx.post(f"{bound[1]}/v1/chat/completions", timeout=10, json={
                "model": "", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}))
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode} before serving; log:\n{text}")
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    raise AssertionError(f"server not serving after {STARTUP_TIMEOUT_S} s; log:\n{log_path.read_text()}")


@pytest.fixture(scope="session")
def api(http_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    logs = tmp_path_factory.mktemp("http-api")
    (logs / "token").write_text(TOKEN + "\n")
    served = start(http_home, logs / "serve.log", "--port", "0", "--max-slots", "4",
                   "--auth-token-file", str(logs / "token"), "--allow-adapter-updates")
    yield served
    assert served.terminate() == 0, served.log()


@pytest.fixture(scope="session")
def tight(http_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    logs = tmp_path_factory.mktemp("http-tight")
    served = start(http_home, logs / "serve.log", "--no-grpc", "--max-slots", "2", "--max-running", "1",
                   "--max-batch-tokens", "64", "--max-queue", "1", "--max-message-bytes", "1MiB",
                   probe_loading=True)
    yield served
    if served.proc.poll() is None:  # the drain test normally stops it
        assert served.terminate() == 0, served.log()


@pytest.fixture(scope="session")
def client(api: Served) -> openai.OpenAI:
    """The official client; no retries, so every error is seen as the server sent it."""
    return openai.OpenAI(base_url=f"{api.url}/v1", api_key=TOKEN, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def http_registry(http_home: Path) -> Registry:
    """The registry both servers serve from."""
    return Registry(http_home)
