"""Reliability suite fixtures: soak scaling, measured figures, adapters made cheaply,
versions planted behind the registry's back, and one shared `loradock serve` subprocess.

`LORADOCK_SOAK=N` multiplies every count in this folder by N (`make soak` sets it);
the default keeps the whole folder within a few minutes on two cores.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from loradock.registry import BaseInfo, Registry
from loradock.registry.manifest import MANIFEST_FILE, file_entries

from tests.adapters import make_lora_adapter
from tests.conftest import TINY_BASE
from tests.server.conftest import ServerProcess, start_server

SOAK = max(1, int(os.environ.get("LORADOCK_SOAK", "1") or "1"))
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"

_FIGURES: list[tuple[str, str]] = []


def scaled(n: int) -> int:
    """`n` times the soak factor (LORADOCK_SOAK, default 1)."""
    return n * SOAK


@pytest.fixture
def figures(request: pytest.FixtureRequest, record_property):
    """report(**values): record measured figures (JUnit properties, and a summary at the end)."""

    def report(**values) -> None:
        text = ", ".join(f"{k}={_fmt(v)}" for k, v in values.items())
        for k, v in values.items():
            record_property(k, v)
        _FIGURES.append((request.node.name, text))
        print(f"[figures] {request.node.name}: {text}")

    return report


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def pytest_terminal_summary(terminalreporter) -> None:
    if _FIGURES:
        terminalreporter.section(f"reliability figures (LORADOCK_SOAK={SOAK})")
        for name, text in _FIGURES:
            terminalreporter.write_line(f"{name}: {text}")


# ---- adapters ---------------------------------------------------------------------------------


def derive_adapter(template: Path, out: Path, seed: int, scale: float = 0.5) -> Path:
    """A new PEFT adapter with `template`'s config and tensor shapes but fresh random weights
    (seconds for dozens: no model is loaded)."""
    import torch
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True)
    shutil.copy2(template / CONFIG, out / CONFIG)
    generator = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(v.shape, generator=generator) * scale for k, v in load_file(template / WEIGHTS).items()}
    save_file(tensors, out / WEIGHTS, metadata={"format": "pt"})
    return out


@pytest.fixture(scope="session")
def templates(tiny_base: BaseInfo, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real PEFT adapters for the tiny base: "qv" (rank 8, q/v), "all" (rank 4, every linear),
    "big" (rank 32, above the servers' --max-rank 16)."""
    root = tmp_path_factory.mktemp("rel-templates")
    return {
        "qv": make_lora_adapter(tiny_base.path, root / "qv", rank=8, targets=("q_proj", "v_proj"), seed=11),
        "all": make_lora_adapter(tiny_base.path, root / "all", rank=4, alpha=8, targets=ALL_LINEAR, seed=12),
        "big": make_lora_adapter(tiny_base.path, root / "big", rank=32, targets=("q_proj",), seed=13),
    }


def plant_version(registry: Registry, name: str, like: str, *, files: dict[str, bytes | None] | None = None,
                  manifest: dict | None = None) -> Path:
    """Write `name@1` straight into the registry's directories, as a buggy or older tool might:
    a copy of version `like` with `files` replaced (None deletes) and `manifest` keys overridden.
    The manifest's digests match the planted files, so only the runtime's own checks stand
    between these files and the model."""
    src = registry.resolve(like).path
    dest = registry.root / "adapters" / name / "versions" / "1"
    dest.parent.mkdir(parents=True)
    shutil.copytree(src, dest)
    for rel, data in (files or {}).items():
        target = dest / rel
        if target.exists():
            target.chmod(0o644)
            target.unlink()
        if data is not None:
            target.write_bytes(data)
    (dest / MANIFEST_FILE).chmod(0o644)
    doc = json.loads((dest / MANIFEST_FILE).read_text())
    rels = [p.name for p in dest.iterdir() if p.name != MANIFEST_FILE]
    doc["files"] = file_entries(dest, rels)
    doc.update(manifest or {})
    (dest / MANIFEST_FILE).write_text(json.dumps(doc))
    return dest


class PickleBomb:
    """Unpickling this creates the file `path`: proof that something ran pickle on it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def pickle_bytes(marker: Path) -> bytes:
    import pickle

    return pickle.dumps({"base_model.model.q_proj.lora_A.weight": PickleBomb(marker)})


def shape_mismatched_weights(weights: Path) -> bytes:
    """`weights` with every lora_A given one extra input column."""
    import torch
    from safetensors.torch import load_file, save

    tensors = load_file(weights)
    return save({k: torch.cat([v, v[:, :1]], dim=1) if "lora_A" in k else v for k, v in tensors.items()})


@pytest.fixture(scope="session")
def pickle_marker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A path that exists only if some code unpickled a planted adapter."""
    return tmp_path_factory.mktemp("pickle-marker") / "unpickled"


@pytest.fixture(scope="session")
def rel_home(tiny_base: BaseInfo, session_home: Path, templates: dict[str, Path], pickle_marker: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared server's registry: good adapters, adapters the faults tests break, and
    adapters planted with every kind of bad file (see BAD_ADAPTERS in test_bad_input.py)."""
    root = tmp_path_factory.mktemp("rel-home") / "home"
    root.mkdir()
    os.symlink(session_home / "bases", root / "bases")
    registry = Registry(root)
    registry.publish(templates["qv"], "good", base=TINY_BASE, aliases=["prod"])
    registry.publish(templates["all"], "good", base=TINY_BASE)
    registry.publish(templates["all"], "acme/other", base=TINY_BASE)
    registry.publish(templates["big"], "toobig", base=TINY_BASE)
    for name in ("victim-corrupt", "victim-delete"):
        registry.publish(derive_adapter(templates["qv"], root.parent / "src" / name, seed=len(name)), name,
                         base=TINY_BASE)
    weights = (templates["qv"] / WEIGHTS).read_bytes()
    plant_version(registry, "truncated", "good@1", files={WEIGHTS: weights[: len(weights) // 2]})
    plant_version(registry, "notsafetensors", "good@1", files={WEIGHTS: b"PK\x03\x04 this is a zip, not safetensors"})
    plant_version(registry, "pickled", "good@1", files={WEIGHTS: None, "adapter_model.bin": pickle_bytes(pickle_marker)})
    plant_version(registry, "wrongshape", "good@1", files={WEIGHTS: shape_mismatched_weights(templates["qv"] / WEIGHTS)})
    plant_version(registry, "otherbase", "good@1", manifest={"base": {"name": "llama-70b", "fingerprint": "f" * 64}})
    plant_version(registry, "badconfig", "good@1", files={CONFIG: b"{not json"})
    plant_version(registry, "dora", "good@1", files={CONFIG: json.dumps(
        {**json.loads((templates["qv"] / CONFIG).read_text()), "use_dora": True}).encode()})
    return root


@pytest.fixture(scope="session")
def rel_server(rel_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One plaintext `loradock serve` (tiny base, quantize none, max rank 16) with metrics,
    shared by the bad-input, fuzzing and faults tests of this folder."""
    proc = start_server(rel_home, tmp_path_factory.mktemp("rel-server") / "serve.log", "--metrics-port", "0")
    yield proc
    assert proc.terminate() == 0, proc.log()


TOKEN = "reliability-token"


@pytest.fixture(scope="session")
def guarded_server(rel_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server with a bearer token, TLS (self-signed, made by openssl) and a tiny queue:
    one running sequence, two waiting. `.tls_cert` is its certificate."""
    import subprocess

    work = tmp_path_factory.mktemp("guarded")
    cert, key, token_file = work / "cert.pem", work / "key.pem", work / "token"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    token_file.write_text(TOKEN + "\n")
    proc = start_server(rel_home, work / "serve.log", "--auth-token-file", str(token_file),
                        "--tls-cert", str(cert), "--tls-key", str(key),
                        "--max-running", "1", "--max-queue", "2", "--metrics-port", "0")
    proc.tls_cert = cert
    yield proc
    assert proc.terminate() == 0, proc.log()
