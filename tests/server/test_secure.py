"""A server with TLS, a bearer token and a one-request queue: auth, TLS, queue-full and
client-cancel behaviour against a real `loradock serve` subprocess."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from loradock.client import Client, LoradockError
from tests.server.conftest import ServerProcess, cli, start_server

TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 / localhost, made with the openssl CLI."""
    out = tmp_path_factory.mktemp("tls")
    cert, key = out / "cert.pem", out / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


@pytest.fixture(scope="module")
def secure_server(server_home: Path, tls_files, tmp_path_factory: pytest.TempPathFactory):
    cert, key = tls_files
    work = tmp_path_factory.mktemp("secure")
    token_file = work / "token"
    token_file.write_text(TOKEN + "\n")
    proc = start_server(
        server_home, work / "serve.log",
        "--auth-token-file", str(token_file), "--tls-cert", str(cert), "--tls-key", str(key),
        "--max-running", "1", "--max-queue", "1", "--metrics-port", "0",
    )
    yield proc
    assert proc.terminate() == 0, proc.log()


@pytest.fixture
def client(secure_server: ServerProcess, tls_files):
    with Client(secure_server.address, token=TOKEN, tls=tls_files[0], timeout=60) as c:
        yield c


def test_right_token_over_tls_works(client):
    result = client.generate("Hello", adapter="alpha", max_new_tokens=3)
    assert result.adapter.ref == "alpha@1" and result.completion_tokens == 3
    assert "".join(e.text for e in client.stream("Hello", adapter="alpha", max_new_tokens=3)) == result.text


def test_cli_uses_token_file_and_tls_ca(secure_server, tls_files, client, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    expected = client.generate("Hello", adapter="alpha", max_new_tokens=4)
    args = ["generate", "--server", secure_server.address, "--adapter", "alpha", "--max-new-tokens", "4"]
    done = cli(*args, "--token-file", str(token_file), "--tls-ca", str(tls_files[0]), "Hello")
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected.text + "\n"
    refused = cli(*args, "--tls-ca", str(tls_files[0]), "Hello")
    assert refused.returncode == 2 and "UNAUTHENTICATED" in refused.stderr


@pytest.mark.parametrize("token", [None, "wrong-token", TOKEN + "x"])
def test_missing_or_wrong_token_is_unauthenticated(secure_server, tls_files, token):
    with Client(secure_server.address, token=token, tls=tls_files[0], timeout=30) as c:
        for call in (lambda: c.generate("Hello", adapter="alpha"),
                     lambda: list(c.stream("Hello", adapter="alpha")),
                     c.list_adapters, c.info, lambda: c.load_adapter("alpha")):
            with pytest.raises(LoradockError) as info:
                call()
            assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert ("missing" if token is None else "wrong") in info.value.details
        assert c.health() == "SERVING"  # health stays open for probes


def test_plaintext_client_cannot_connect(secure_server):
    with Client(secure_server.address, token=TOKEN, timeout=5) as c:
        with pytest.raises(LoradockError) as info:
            c.generate("Hello", adapter="alpha")
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(LoradockError):
            c.health()


def test_untrusted_certificate_is_refused(secure_server):
    with Client(secure_server.address, token=TOKEN, tls=True, timeout=5) as c:  # system roots only
        with pytest.raises(LoradockError) as info:
            c.generate("Hello", adapter="alpha")
        assert info.value.code == grpc.StatusCode.UNAVAILABLE


def _metric(url: str, name: str) -> float:
    for line in urllib.request.urlopen(url, timeout=10).read().decode().splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_queue_full_then_cancel_frees_the_slot_at_once(secure_server, client):
    url = secure_server.metrics_url
    alpha_tokens = 'loradock_engine_generated_tokens_total{adapter="alpha",version="1"}'
    long_run = client.stream("A very long story", adapter="alpha", max_new_tokens=1900, ignore_eos=True)
    events = iter(long_run)
    next(events)  # running: it holds the only running place
    queued = client.stream("Waiting my turn", adapter="gamma", max_new_tokens=4)
    queued_events = iter(queued)  # the call is sent now; it waits in the one-place queue
    _wait_for(lambda: _metric(url, "loradock_engine_waiting") == 1)

    with pytest.raises(LoradockError) as info:
        client.generate("One too many", adapter="beta@1", max_new_tokens=4)
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue" in info.value.details.lower()

    long_run.cancel()
    started = time.monotonic()
    assert len(list(queued_events)) == 4  # the queued request runs as soon as the slot frees
    assert queued.result.adapter.ref == "gamma@1"
    assert time.monotonic() - started < 10
    stopped_at = _metric(url, alpha_tokens)
    assert stopped_at < 1900
    time.sleep(0.5)
    assert _metric(url, alpha_tokens) == stopped_at  # the cancelled request no longer decodes
    assert _metric(url, 'loradock_requests_total{adapter="alpha",code="CANCELLED",method="GenerateStream"}') == 1
    assert client.generate("Still serving", adapter="alpha", max_new_tokens=2).completion_tokens == 2
