"""Server lifecycle: NOT_SERVING until the engine is warm, and SIGTERM drain."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import grpc
import pytest
from loradock.registry import Registry
from loradock.runtime import EngineConfig

from loradock.client import Client, LoradockError
from tests.conftest import TINY_BASE
from tests.server.conftest import start_server


def test_health_is_not_serving_until_the_engine_is_warm(server_home: Path):
    from loradock.runtime import Engine
    from loradock.runtime.server.app import create_server

    engine = Engine(EngineConfig(base=TINY_BASE, quantize="none", device="cpu", max_rank=16),
                    Registry(server_home))
    server, port = create_server(engine, Registry(server_home), port=0)
    server.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout=30) as client:
            assert client.health() == "NOT_SERVING"
            with pytest.raises(LoradockError) as info:
                client.generate("Hello", adapter="alpha")
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
            assert "loading" in info.value.details

            waiter = threading.Thread(target=client.wait_until_serving, kwargs={"timeout": 60})
            waiter.start()
            engine.start()
            server.mark_serving()
            waiter.join(60)
            assert not waiter.is_alive()
            assert client.health() == "SERVING"
            assert client.generate("Hello", adapter="alpha", max_new_tokens=2).adapter.ref == "alpha@1"
        assert server.drain(timeout=10)
    finally:
        server.stop()
        engine.shutdown(drain=False)


def test_sigterm_drains_running_requests_then_exits_zero(server_home: Path, tmp_path: Path):
    proc = start_server(server_home, tmp_path / "serve.log")
    total = 800
    with Client(proc.address, timeout=120) as client:
        stream = client.stream("Keep going", adapter="alpha", max_new_tokens=total, ignore_eos=True)
        events = iter(stream)
        received = [next(events)]

        proc.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while "draining" not in proc.log():
            assert time.monotonic() < deadline, proc.log()
            time.sleep(0.02)

        with Client(proc.address, timeout=10) as late:  # a new request once draining started
            with pytest.raises(LoradockError) as info:
                late.generate("Too late", adapter="alpha", max_new_tokens=2)
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
        # the drain waits for the running request, so the server has not stopped yet
        in_flight_when_refused = "stopped" not in proc.log()

        received += list(events)  # the running request still gets every token
    assert in_flight_when_refused
    assert len(received) == total
    assert stream.result.finish_reason.value == "length" and stream.result.completion_tokens == total
    assert proc.proc.wait(60) == 0, proc.log()
    assert "stopped" in proc.log().splitlines()[-1]
