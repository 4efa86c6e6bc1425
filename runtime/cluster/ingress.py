"""The cluster's ingress deployment: the HTTP edge's OpenAI routes over the replicas.

It resolves each request's `model` (aliases included) to the concrete `name@N` once, with the
HTTP edge's catalog over its own view of the registry, so every replica serves the same version
and an alias move takes effect cluster-wide once a replica has loaded the new version (warm
promotion, `ClusterEngine.route`); then `ClusterEngine` sends the
request to a replica holding that version. `/metrics` adds each replica's engine counters with
a `replica` label. The busiest versions get several homes (hot.py).
"""

from __future__ import annotations

from pathlib import Path

from loradock.registry import Registry
from loradock.runtime.http.routes import create_app
from loradock.runtime.metrics import Metrics
from ray import serve
from ray.serve.handle import DeploymentHandle

from .hot import HotVersions
from .remote_engine import ClusterEngine


@serve.ingress()
class Ingress:
    """Ray Serve builds the ASGI app after the constructor (`__serve_build_asgi_app__`)."""

    async def __init__(self, replicas: DeploymentHandle, registry_root: str | None,
                       auth_token_file: str | None = None, hot_adapters: int = 2, hot_homes: int = 2,
                       promotion_wait_s: float = 60.0) -> None:
        self._registry = Registry(registry_root)
        info = await replicas.info.remote()  # waits for the first replica to be up
        self._engine = ClusterEngine(replicas, info, self._registry, HotVersions(hot_adapters, hot_homes),
                                     promotion_wait_s)
        self._metrics = Metrics(replica_stats=self._engine.board.snapshot)
        self._auth_token = Path(auth_token_file).read_text().strip() if auth_token_file else None

    def __serve_build_asgi_app__(self):
        return create_app(self._engine, self._registry, metrics=self._metrics, auth_token=self._auth_token)
