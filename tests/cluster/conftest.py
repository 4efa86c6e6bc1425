"""Cluster fixtures: one local Ray (2 CPUs) and one loradock Serve application per session,
two engine replicas on the tiny base (one torch thread each) over a registry of real adapters,
its HTTP port on 127.0.0.1, and an in-process engine on the same registry as the reference."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from loradock.registry import BaseInfo, Registry
from loradock.runtime import Engine, EngineConfig

from tests.adapters import make_lora_adapter
from tests.conftest import TINY_BASE

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTERS = [f"c{i}" for i in range(4)]
ENGINE = {"quantize": "none", "device": "cpu", "max_slots": 4, "max_rank": 16, "max_running": 4,
          "max_batch_tokens": 256, "max_model_len": 512, "max_prompt_tokens": 256,
          "kv_cache_tokens": 4096, "registry_poll_s": 0.05, "cpu_threads": 1}
REPLICAS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def cluster_home(session_home: Path, tiny_base: BaseInfo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry (shared by the replicas and the ingress: one filesystem) holding c0..c3,
    `victim`, `mover` (two versions, prod -> 1) and `broken` (tampered weights)."""
    work = tmp_path_factory.mktemp("cluster")
    root = work / "home"
    root.mkdir()
    os.symlink(session_home / "bases", root / "bases")
    registry = Registry(root)
    dirs = {}
    for i, name in enumerate([*ADAPTERS, "mover2"]):
        dirs[name] = make_lora_adapter(tiny_base.path, work / "src" / name, rank=(4, 8, 16)[i % 3],
                                       targets=ALL_LINEAR if i % 2 else ("q_proj", "v_proj"), seed=300 + i)
    for name in ADAPTERS:
        registry.publish(dirs[name], name, base=TINY_BASE)
    registry.publish(dirs["c2"], "victim", base=TINY_BASE)  # only the replica-kill test uses it
    registry.publish(dirs["c0"], "mover", base=TINY_BASE, aliases=["prod"])
    registry.publish(dirs["mover2"], "mover", base=TINY_BASE)
    broken = registry.publish(dirs["c1"], "broken", base=TINY_BASE)
    weights = broken.path / "adapter_model.safetensors"
    weights.chmod(0o644)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # the replica's digest check refuses it
    weights.write_bytes(bytes(data))
    return root


@dataclass
class Cluster:
    url: str  # http://127.0.0.1:PORT
    registry: Registry

    def metrics(self) -> dict[tuple[str, str, str], dict[str, float]]:
        """{(replica, adapter, version): {stat: value}} from the ingress's /metrics."""
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        out: dict[tuple[str, str, str], dict[str, float]] = {}
        for stat, labels, value in re.findall(r"^loradock_replica_(\w+)_total\{([^}]*)\} (\S+)$", text, re.M):
            label = dict(re.findall(r'(\w+)="([^"]*)"', labels))
            out.setdefault((label["replica"], label["adapter"], label["version"]), {})[stat] = float(value)
        return out


@pytest.fixture(scope="module")
def cluster(cluster_home: Path) -> Iterator[Cluster]:
    """Module-scoped: Ray and its replicas are gone once the module's tests ran."""
    from loradock.runtime.cluster.app import APP_NAME, build_app

    ray.init(num_cpus=REPLICAS, include_dashboard=False, object_store_memory=200 * 2**20,
             log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "LORADOCK_HOME": str(cluster_home)}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app({"base": TINY_BASE, "registry_root": str(cluster_home), "replicas": REPLICAS,
                     "num_cpus": 1, "max_ongoing_requests": 2, "engine": ENGINE})
    serve.run(app, name=APP_NAME, route_prefix="/")
    try:
        yield Cluster(f"http://127.0.0.1:{port}", Registry(cluster_home))
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def reference_engine(cluster_home: Path) -> Iterator[Engine]:
    """One engine in this process, configured like a replica: the single-engine answers."""
    import torch

    threads = torch.get_num_threads()  # the engine sets 1 process-wide; later tests get theirs back
    engine = Engine(EngineConfig(base=TINY_BASE, **ENGINE), Registry(cluster_home)).start()
    yield engine
    engine.shutdown(drain=False, timeout=5)
    torch.set_num_threads(threads)

