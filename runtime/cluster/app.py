"""The Ray Serve application: an `Ingress` over `EngineReplica`s.

`build_app` is what `serve run` / `serve deploy` config files name:

    applications:
      - name: loradock
        route_prefix: /
        import_path: loradock.runtime.cluster.app:build_app
        args: {base: smollm2-135m-instruct, replicas: 2, num_gpus: 1, engine: {max_slots: 16}}

`args` are `ClusterArgs` fields (runtime/cluster/args.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ray import serve
from ray.serve import Application

from .args import ClusterArgs
from .ingress import Ingress
from .replica import EngineReplica

APP_NAME = "loradock"
REPLICA_DEPLOYMENT = "EngineReplica"
INGRESS_DEPLOYMENT = "Ingress"


def build_app(args: Mapping[str, Any] | ClusterArgs) -> Application:
    """The application for `args` (a `ClusterArgs` or its fields as a mapping)."""
    args = args if isinstance(args, ClusterArgs) else ClusterArgs.from_mapping(args)
    config = args.engine_config
    if not config.cpu_threads and not args.num_gpus:  # torch's default takes every core of the node
        config.cpu_threads = max(1, math.floor(args.num_cpus))
    scaling: dict[str, Any] = ({"autoscaling_config": args.autoscaling} if args.autoscaling
                               else {"num_replicas": args.replicas})
    replica = serve.deployment(EngineReplica, name=REPLICA_DEPLOYMENT).options(
        max_ongoing_requests=args.max_ongoing_requests or config.max_running,
        ray_actor_options={"num_cpus": args.num_cpus, "num_gpus": args.num_gpus},
        graceful_shutdown_timeout_s=30,
        **scaling,
    )
    ingress = serve.deployment(Ingress, name=INGRESS_DEPLOYMENT).options(
        ray_actor_options={"num_cpus": 0},  # I/O only: the engines need the cores
        max_ongoing_requests=1000,
    )
    replicas = replica.bind(config, args.registry_root, args.multiplexed_slots, args.hub_pull)
    return ingress.bind(replicas, args.registry_root, args.auth_token_file, args.hot_adapters, args.hot_homes,
                        config.promotion_wait_s)
