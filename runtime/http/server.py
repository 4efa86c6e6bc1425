"""The HTTP edge as a server: uvicorn in a thread of its own, bound before the engine loads.

`create_http_server(...) -> (server, port)` binds at once (a busy port is an error before
the base loads); `start()` serves (API calls answer 503 "loading" until `mark_serving()`);
`drain()` answers new API calls 503 "draining" on the still-open port while running ones
finish, then stops. It has the shape of the gRPC edge's `RuntimeServer`, so the lifecycle
runs either, or both.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import uvicorn
from loradock.registry import Registry
from loradock.registry.trust import TrustPolicy
from loradock.runtime.lifecycle import EdgeState
from loradock.runtime.metrics import Metrics

from .routes import create_app

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 10.0


class HttpServer:
    """A bound, not yet started uvicorn server running the HTTP edge's app."""

    def __init__(self, server: uvicorn.Server, sock: socket.socket, state: EdgeState, url: str) -> None:
        self._server = server
        self._sock = sock
        self._state = state
        self.url = url  # http(s)://HOST:PORT
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="loradock-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self._server.started:
            raise OSError(f"the HTTP server did not start on {self.url}")
        log.info("HTTP API on %s (answers 503 until the engine is ready)", self.url)

    def mark_serving(self) -> None:
        log.info("serving HTTP on %s", self.url)

    def drain(self, timeout: float) -> bool:
        """New API calls get 503 while running ones finish (up to `timeout` s); then stop."""
        self._state.start_draining()
        drained = self._state.wait_idle(timeout)
        self._shutdown(force=not drained)
        return drained

    def stop(self) -> None:
        self._shutdown(force=True)

    def _shutdown(self, force: bool) -> None:
        self._server.should_exit = True
        self._server.force_exit = force  # cut running streams off instead of waiting for them
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT_S)
        self._sock.close()


def create_http_server(
    engine,
    registry: Registry,
    *,
    metrics: Metrics,
    host: str = "127.0.0.1",
    port: int = 8000,
    auth_token: str | None = None,
    allow_adapter_updates: bool = False,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    max_body_bytes: int | None = None,
) -> tuple[HttpServer, int]:
    """Build the app and bind host:port (0 = a free port). Returns the server and the bound port."""
    for what, path in (("certificate", tls_cert), ("private key", tls_key)):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"TLS {what} file {path} does not exist")
    uvicorn_log = logging.getLogger("uvicorn.error")
    if uvicorn_log.level == logging.NOTSET:  # its start/stop chatter repeats what we log
        uvicorn_log.setLevel(logging.WARNING)
    state = EdgeState()
    app = create_app(engine, registry, metrics=metrics, state=state, auth_token=auth_token,
                     allow_adapter_updates=allow_adapter_updates, max_body_bytes=max_body_bytes)
    app.state.console.serving.start()  # the serving page's "last minutes" start with the server
    sock = bind(host, port)
    bound = sock.getsockname()[1]
    scheme = "https" if tls_cert else "http"
    return HttpServer(uvicorn.Server(uvicorn_config(app, tls_cert, tls_key)), sock, state,
                      f"{scheme}://{host}:{bound}"), bound


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (0: a free port); OSError naming the address otherwise."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} for HTTP: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def uvicorn_config(app, tls_cert: Path | None = None, tls_key: Path | None = None) -> uvicorn.Config:
    return uvicorn.Config(
        app, log_config=None, access_log=False, lifespan="off", loop="asyncio", http="h11",
        timeout_graceful_shutdown=STOP_TIMEOUT_S, timeout_keep_alive=30,
        ssl_certfile=str(tls_cert) if tls_cert else None, ssl_keyfile=str(tls_key) if tls_key else None,
    )


def serve_console(registry: Registry, *, host: str, port: int, auth_token: str | None = None,
                  allow_updates: bool = False, policy: TrustPolicy | None = None,
                  on_listening: Callable[[str], None] | None = None) -> None:
    """`loradock ui`: the web console over `registry` alone, until SIGINT or SIGTERM;
    `on_listening(url)` is called once the port is bound."""
    from .console import create_console_app

    app = create_console_app(registry, auth_token=auth_token, allow_updates=allow_updates, policy=policy)
    sock = bind(host, port)
    if on_listening is not None:
        on_listening(f"http://{f'[{host}]' if ':' in host else host}:{sock.getsockname()[1]}")
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # its start/stop chatter repeats ours
    uvicorn.Server(uvicorn_config(app)).run(sockets=[sock])
