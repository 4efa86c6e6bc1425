"""`loradock cluster serve`: the engine scaled out on Ray Serve (runtime/cluster).

Ray is an optional extra (`pip install 'loradock[cluster]'`); it is imported only when the
command runs. The engine flags are the same as `loradock serve`'s, one per EngineConfig field.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from loradock.errors import UserError
from loradock.registry import Registry
from loradock.runtime.config import EngineConfig

from .serve import add_engine_arguments, pick_base, read_token_file

INSTALL_HINT = "Ray Serve is not installed: pip install 'loradock[cluster]'"


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "cluster", help="scale out on Ray Serve: many engine replicas behind one OpenAI API",
        description="Run loradock on a Ray cluster: N engine replicas (one engine per device) behind "
        "the OpenAI-compatible HTTP API, each request sent to the replicas that already hold its "
        "adapter version (Ray Serve model multiplexing). See docs/scale-out.md.")
    actions = parser.add_subparsers(dest="cluster_command", metavar="ACTION", required=True)
    serve = actions.add_parser(
        "serve", help="deploy the application and serve until stopped (Ctrl-C / SIGTERM)",
        description="Deploy the loradock Ray Serve application (the same one `serve run "
        "loradock.runtime.cluster.app:build_app` starts) on the Ray cluster at --address, or on a "
        "local Ray started here, and serve the OpenAI API on --http-port until stopped.")
    where = serve.add_argument_group("cluster")
    where.add_argument("--base", help="base model of every replica: a registry base name or a model directory "
                       "(default: the only base in the registry)")
    where.add_argument("--replicas", type=int, default=1, help="engine replicas (default: 1)")
    where.add_argument("--num-cpus", type=float, default=1.0,
                       help="CPUs reserved per replica; on CPU it also sets torch threads (default: 1)")
    where.add_argument("--num-gpus", type=float, default=0.0,
                       help="GPUs reserved per replica, 1 = one engine per GPU (default: 0)")
    where.add_argument("--address", default=None,
                       help="Ray cluster to join ('auto' = the one this node belongs to, or "
                       "ray://HOST:10001); default: start a local Ray in this process")
    where.add_argument("--local-cpus", type=int, default=None,
                       help="CPUs of the local Ray started without --address (default: all)")
    where.add_argument("--http-host", default="127.0.0.1",
                       help="address Serve's HTTP proxies listen on (0.0.0.0 for all; default 127.0.0.1)")
    where.add_argument("--http-port", type=int, default=8000, help="HTTP port of the OpenAI API (default: 8000)")
    where.add_argument("--auth-token-file", type=Path, default=None,
                       help="file holding the bearer token the API requires (read on the ingress's node)")
    where.add_argument("--hub-pull", action="store_true",
                       help="replicas pull versions their registry lacks from the Hub (manifest source "
                       "repo + commit) and check the digest; without it every replica needs the version")
    where.add_argument("--hot-adapters", type=int, default=2, metavar="K",
                       help="the K busiest adapter versions (most of the ingress's last 1,000 requests, 50 at "
                       "least) live on --hot-homes replicas each, their requests spread over them; 0: off "
                       "(default: 2)")
    where.add_argument("--hot-homes", type=int, default=2, metavar="N",
                       help="replicas a hot adapter version lives on (default: 2)")
    where.add_argument("--detach", action="store_true",
                       help="return once deployed, leaving the application on the cluster (needs --address)")
    scale = serve.add_argument_group("autoscaling (any of these turns it on; --replicas is the start)")
    scale.add_argument("--min-replicas", type=int, default=None, help="fewest replicas")
    scale.add_argument("--max-replicas", type=int, default=None, help="most replicas")
    scale.add_argument("--target-ongoing-requests", type=float, default=None,
                       help="requests in flight per replica to aim for (default: half of --max-running)")
    scale.add_argument("--max-ongoing-requests", type=int, default=None,
                       help="requests Ray sends one replica at once (default: --max-running)")
    add_engine_arguments(serve)
    serve.set_defaults(func=cmd_cluster_serve)


def cmd_cluster_serve(args: argparse.Namespace) -> int:
    try:
        from loradock.runtime.cluster.args import ClusterArgs
        from loradock.runtime.cluster.launch import serve_until_signalled
    except ImportError as e:
        if "ray" not in str(e):
            raise
        raise UserError(INSTALL_HINT) from None
    if args.detach and not args.address:
        raise UserError("--detach leaves the application on a running cluster: give --address too")
    if not args.base:  # as `serve` does: the registry's only base, or a clear error naming them
        args.base = pick_base(Registry(args.home), None)
    defaults = EngineConfig(base=args.base)
    engine = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)
              if f.name != "base" and getattr(args, f.name) != getattr(defaults, f.name)}
    token_file = args.auth_token_file
    if token_file is not None:
        read_token_file(token_file)  # a clear error now, not in the ingress's log
    try:
        cluster = ClusterArgs(
            base=args.base, registry_root=args.home or os.environ.get("LORADOCK_HOME"),
            replicas=args.replicas, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
            min_replicas=args.min_replicas, max_replicas=args.max_replicas,
            target_ongoing_requests=args.target_ongoing_requests,
            max_ongoing_requests=args.max_ongoing_requests, hub_pull=args.hub_pull,
            auth_token_file=str(token_file.resolve()) if token_file else None,
            hot_adapters=args.hot_adapters, hot_homes=args.hot_homes, engine=engine)
        cluster.engine_config  # noqa: B018 - validates the engine flags now
    except ValueError as e:
        raise UserError(str(e)) from None
    serve_until_signalled(cluster, address=args.address, local_cpus=args.local_cpus, host=args.http_host,
                          port=args.http_port, detach=args.detach, say=print)
    return 0
