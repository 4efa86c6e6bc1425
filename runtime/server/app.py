"""Server assembly: `create_server` wires the servicer, health, reflection, auth, TLS and
message limits; `serve` runs it alone through the shared lifecycle (`runtime/lifecycle.py`:
start, warm the engine, report SERVING, wait for SIGTERM/SIGINT, drain, exit). The CLI runs
it beside the HTTP edge through the same lifecycle.
"""

from __future__ import annotations

import logging
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from loradock.proto.loradock.v1 import runtime_pb2 as pb
from loradock.registry import Registry
from loradock.runtime import lifecycle
from loradock.runtime.lifecycle import DEFAULT_DRAIN_TIMEOUT_S, StartupError
from loradock.runtime.metrics import Metrics
from loradock.runtime.server.handlers import add_runtime_servicer
from loradock.runtime.server.interceptors import BearerTokenAuth, DrainGate
from loradock.runtime.server.servicer import RuntimeServicer

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Runtime"].full_name  # "loradock.v1.Runtime"
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
__all__ = ["DEFAULT_DRAIN_TIMEOUT_S", "RuntimeServer", "StartupError", "TlsFiles", "create_server", "serve"]


@dataclass(frozen=True)
class TlsFiles:
    """PEM certificate chain and private key of the server."""

    cert: Path
    key: Path

    def credentials(self) -> grpc.ServerCredentials:
        for what, path in (("certificate", self.cert), ("private key", self.key)):
            if not Path(path).is_file():
                raise FileNotFoundError(f"TLS {what} file {path} does not exist")
        return grpc.ssl_server_credentials([(Path(self.key).read_bytes(), Path(self.cert).read_bytes())])


class RuntimeServer:
    """A built, not yet started gRPC server plus the switches `serve` needs."""

    def __init__(self, grpc_server: grpc.Server, health_servicer: health.HealthServicer, gate: DrainGate,
                 metrics: Metrics, address: str = "") -> None:
        self.grpc_server = grpc_server
        self.health = health_servicer
        self.metrics = metrics
        self.address = address  # HOST:PORT as bound
        self._gate = gate

    def start(self) -> None:
        self.grpc_server.start()

    def mark_serving(self) -> None:
        """Health reports SERVING (call once the engine is loaded and warm)."""
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving on %s", self.address)

    def drain(self, timeout: float = DEFAULT_DRAIN_TIMEOUT_S) -> bool:
        """Stop accepting calls and wait up to `timeout` s for running ones; True if all finished.
        The server keeps listening meanwhile, so a late call gets the gate's UNAVAILABLE (retry
        elsewhere), not a connection cut by gRPC's own stop."""
        self.health.enter_graceful_shutdown()  # NOT_SERVING, and stays so
        self._gate.close()
        deadline = time.monotonic() + timeout
        idle = self._gate.wait_idle(timeout)
        stopped = self.grpc_server.stop(grace=max(0.0, deadline - time.monotonic())).wait(timeout + 5)
        return idle and stopped

    def stop(self) -> None:
        """Stop at once, aborting running calls."""
        self.grpc_server.stop(grace=None)


def create_server(
    engine,
    registry: Registry,
    *,
    host: str = "127.0.0.1",
    port: int = 50051,
    auth_token: str | None = None,
    tls: TlsFiles | None = None,
    max_workers: int = 64,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    metrics: Metrics | None = None,
) -> tuple[RuntimeServer, int]:
    """Build the server and bind host:port (0 = a free port). Returns it and the bound port.

    Health starts NOT_SERVING; call `mark_serving()` once the engine is warm.
    """
    gate = DrainGate()
    interceptors = [gate, *([BearerTokenAuth(auth_token)] if auth_token else [])]
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes),
               # grpc shares ports by default: a second server on a busy port would "start" fine
               ("grpc.so_reuseport", 0)]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="loradock-rpc"),
        interceptors=interceptors,
        options=options,
    )
    metrics = metrics or Metrics()
    add_runtime_servicer(RuntimeServicer(engine, registry, metrics), server)

    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )

    address = f"{host}:{port}"
    try:
        bound = server.add_secure_port(address, tls.credentials()) if tls else server.add_insecure_port(address)
    except RuntimeError as e:  # grpc's "Failed to bind to address"
        raise OSError(f"cannot listen on {address}: the port is in use or the host is not local") from e
    return RuntimeServer(server, health_servicer, gate, metrics, f"{host}:{bound}"), bound


def serve(
    engine,
    registry: Registry,
    *,
    host: str = "127.0.0.1",
    port: int = 50051,
    metrics_port: int | None = None,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT_S,
    **server_options,
) -> int:
    """Serve gRPC alone until SIGTERM/SIGINT, then drain: new calls get UNAVAILABLE, running
    ones finish, the engine shuts down. Returns the exit status (0 after a clean drain)."""
    metrics = server_options.pop("metrics", None) or Metrics(lambda: engine.stats() if engine.ready else {})
    server, _ = create_server(engine, registry, host=host, port=port, metrics=metrics, **server_options)
    return lifecycle.serve(engine, [server], drain_timeout=drain_timeout, metrics=metrics,
                           metrics_host=host, metrics_port=metrics_port)
