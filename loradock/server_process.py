"""Run `loradock serve` as a child process: a free port, a log file, health SERVING, SIGTERM.

Used by the demo (and usable by anything that needs a real server in another
process): the child is the same `loradock serve` a user runs, so what works here
works from a shell.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from loradock.errors import UserError

log = logging.getLogger(__name__)


class ServerStartError(UserError):
    """The server exited or never became healthy; the message quotes its log."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def log_tail(path: Path, lines: int = 25) -> str:
    """The last `lines` lines of a log file ('' if it does not exist)."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    # tqdm redraws with carriage returns; keep only the last state of each line.
    cleaned = [line.rsplit("\r", 1)[-1] for line in text.splitlines()]
    return "\n".join(cleaned[-lines:])


class ServerProcess:
    """`loradock --home HOME serve --base BASE --port PORT [extra_args]` in a child process.

    `is_serving(address) -> bool` is the readiness probe (a gRPC health check);
    `start()` returns once it is true and raises ServerStartError, quoting the
    log, if the child exits first or `ready_timeout_s` passes. Use as a context
    manager so the child never outlives its parent's `with` block.
    """

    def __init__(
        self,
        home: Path,
        base: str,
        *,
        log_path: Path,
        is_serving: Callable[[str], bool],
        host: str = "127.0.0.1",
        port: int | None = None,
        extra_args: Sequence[str] = (),
        ready_timeout_s: float = 600.0,
    ) -> None:
        self.home = Path(home)
        self.base = base
        self.log_path = Path(log_path)
        self.host = host
        self.port = port or free_port(host)
        self.extra_args = tuple(extra_args)
        self.ready_timeout_s = ready_timeout_s
        self._is_serving = is_serving
        self._proc: subprocess.Popen | None = None
        self._log_file = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("server not started")
        return self._proc.pid

    @property
    def args(self) -> list[str]:
        """The `loradock` arguments, as a user would type them."""
        return [
            "--home", str(self.home), "serve", "--base", self.base,
            "--host", self.host, "--port", str(self.port), *self.extra_args,
        ]

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "loradock.cli", *self.args]

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the child and wait until its health check says SERVING."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = self.log_path.open("ab")
        env = {**os.environ, "LORADOCK_HOME": str(self.home), "PYTHONUNBUFFERED": "1"}
        log.debug("starting %s", " ".join(self.command))
        self._proc = subprocess.Popen(
            self.command, stdout=self._log_file, stderr=subprocess.STDOUT, env=env,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            code = self._proc.poll()
            if code is not None:
                self._close_log()
                raise ServerStartError(
                    f"the server exited with code {code} before it was ready; "
                    f"last lines of {self.log_path}:\n{log_tail(self.log_path)}"
                )
            if self._is_serving(self.address):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise ServerStartError(
                    f"the server was not SERVING after {self.ready_timeout_s:.0f} s; "
                    f"last lines of {self.log_path}:\n{log_tail(self.log_path)}"
                )
            time.sleep(0.5)

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM (graceful drain), wait up to `timeout_s`, then SIGKILL. Returns the exit code."""
        if self._proc is None:
            raise RuntimeError("server not started")
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("server pid %d ignored SIGTERM for %.0f s; killing it", self.pid, timeout_s)
                self._proc.kill()
                self._proc.wait()
        self._close_log()
        return self._proc.returncode

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.alive():
            self.stop()
        self._close_log()
