"""Starting the application on a Ray cluster (or a local one) for `loradock cluster serve`."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

import ray
from ray import serve

from .app import APP_NAME, build_app
from .args import ClusterArgs


def connect(address: str | None, local_cpus: int | None) -> None:
    """Join the Ray cluster at `address` ("auto": the one this node belongs to), or start a
    local one with `local_cpus` CPUs (default: all) when no address is given."""
    if address:
        ray.init(address=address, configure_logging=False)
    else:
        ray.init(num_cpus=local_cpus, include_dashboard=False, configure_logging=False)


def deploy(args: ClusterArgs, host: str, port: int) -> str:
    """Start Serve's HTTP proxies on host:port and deploy (or update) the application; returns
    once every replica is up. The URL of the OpenAI API."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}/v1"


def serve_until_signalled(args: ClusterArgs, *, address: str | None, local_cpus: int | None,
                          host: str, port: int, detach: bool, say: Callable[[str], None]) -> None:
    """Connect, deploy, then (unless `detach`) keep serving until SIGINT/SIGTERM, when the
    application is deleted (its replicas drain their requests first)."""
    connect(address, local_cpus)
    say(f"deploying {args.replicas if not args.autoscaling else 'autoscaled'} engine replica(s) "
        f"of {args.base} on Ray ({ray.cluster_resources().get('CPU', 0):g} CPUs, "
        f"{ray.cluster_resources().get('GPU', 0):g} GPUs) ...")
    url = deploy(args, host, port)
    say(f"serving the OpenAI API at {url} (Ray Serve application {APP_NAME!r})")
    if detach:
        return
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    say("stopping: deleting the application (running requests finish first)")
    serve.delete(APP_NAME)
    if not address:
        serve.shutdown()
        ray.shutdown()
