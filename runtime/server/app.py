"""Server assembly: `create_server` wires the servicer, health, reflection, auth, TLS and
message limits; `serve` runs it: start, warm the engine, report SERVING, wait for
SIGTERM/SIGINT, drain, exit.
"""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from loradock.proto.loradock.v1 import runtime_pb2 as pb
from loradock.registry import Registry
from loradock.runtime.server.handlers import add_runtime_servicer
from loradock.runtime.server.interceptors import BearerTokenAuth, DrainGate
from loradock.runtime.server.metrics import Metrics, start_metrics_http
from loradock.runtime.server.servicer import RuntimeServicer

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Runtime"].full_name  # "loradock.v1.Runtime"
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
DEFAULT_DRAIN_TIMEOUT_S = 60.0


class StartupError(RuntimeError):
    """The engine refused its configuration while starting (e.g. --device cuda without a GPU)."""


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
                 metrics: Metrics) -> None:
        self.grpc_server = grpc_server
        self.health = health_servicer
        self.metrics = metrics
        self._gate = gate

    def start(self) -> None:
        self.grpc_server.start()

    def mark_serving(self) -> None:
        """Health reports SERVING (call once the engine is loaded and warm)."""
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)

    def drain(self, timeout: float = DEFAULT_DRAIN_TIMEOUT_S) -> bool:
        """Stop accepting calls and wait up to `timeout` s for running ones; True if all finished."""
        self.health.enter_graceful_shutdown()  # NOT_SERVING, and stays so
        self._gate.close()
        return self.grpc_server.stop(grace=timeout).wait(timeout + 5)

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
    return RuntimeServer(server, health_servicer, gate, metrics), bound


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
    """Run until SIGTERM/SIGINT, then drain: new calls get UNAVAILABLE, running ones
    finish, the engine shuts down. Returns the exit status (0 after a clean drain)."""
    server, bound = create_server(engine, registry, host=host, port=port, **server_options)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    server.start()  # health answers NOT_SERVING while the base loads
    metrics_http = None
    try:
        if metrics_port is not None:
            metrics_http = start_metrics_http(lambda: server.metrics.render(engine.stats()), host, metrics_port)
            log.info("metrics on http://%s:%d/metrics", host, metrics_http.server_address[1])
        log.info("loading the base model and warming up ...")
        try:
            engine.start()
        except ValueError as e:  # the engine's word for a configuration this machine cannot serve
            raise StartupError(f"cannot start the engine: {e}") from e
        if not stop.is_set():
            server.mark_serving()
            log.info("serving on %s:%d", host, bound)
        stop.wait()
        log.info("draining: refusing new requests, waiting up to %.0f s for running ones", drain_timeout)
        drained = server.drain(drain_timeout)
        engine.shutdown(drain=True, timeout=drain_timeout)
        log.info("stopped" if drained else "stopped; some requests were cut off after the drain timeout")
        return 0
    except BaseException:
        server.stop()
        if engine.ready:
            engine.shutdown(drain=False)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if metrics_http is not None:
            metrics_http.shutdown()
            metrics_http.server_close()
