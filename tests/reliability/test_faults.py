"""Faults around a running server: clients that cancel or vanish mid-stream, registry files
corrupted or deleted underneath it, SIGTERM with requests in flight, SIGKILL and restart,
and publishers killed mid-way while the server reads the same registry."""

from __future__ import annotations

import hashlib
import random
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from loradock.registry import Registry

from loradock.client import Client, LoradockError
from tests.conftest import TINY_BASE
from tests.registry.test_integrity import run_publishers
from tests.reliability.conftest import WEIGHTS, derive_adapter, scaled
from tests.reliability.probes import engine_load, wait_for
from tests.server.conftest import start_server

PROMPT = "The quick brown fox"


def test_cancelled_and_vanished_streams_free_their_sequences(rel_server, figures):
    """Clients cancel mid-stream or drop their channel: running/waiting/KV return to baseline
    at once and the server answers the next request."""
    url = rel_server.metrics_url
    baseline = engine_load(url)
    per_round, rounds, slowest = 8, scaled(1), 0.0
    for _ in range(rounds):
        clients = [Client(rel_server.address, timeout=120) for _ in range(per_round)]
        streams = [c.stream(PROMPT, adapter="good@prod" if i % 2 else "acme/other", max_new_tokens=1500,
                            ignore_eos=True) for i, c in enumerate(clients)]
        for stream in streams:
            next(iter(stream))  # admitted and decoding
        running, _, reserved = engine_load(url)
        assert running == per_round and reserved > baseline[2]
        for i, (client, stream) in enumerate(zip(clients, streams, strict=True)):
            if i % 2:
                stream.cancel()
            else:
                client.close()  # the client goes away without a word
        slowest = max(slowest, wait_for(lambda: engine_load(url) == baseline, what="engine back to baseline"))
        for client in clients:
            client.close()
        with Client(rel_server.address, timeout=60) as c:
            assert c.generate(PROMPT, adapter="good@prod", max_new_tokens=3).completion_tokens == 3
        assert engine_load(url) == baseline
    figures(streams=per_round * rounds, slowest_return_to_baseline_s=round(slowest, 3),
            baseline_running_waiting_kv=baseline)


class Background:
    """Clients asking the good adapter over and over; every failure is kept."""

    def __init__(self, address: str, threads: int = 2) -> None:
        self.address, self.stop, self.errors, self.done = address, threading.Event(), [], 0
        self.expected = None
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _run(self) -> None:
        with Client(self.address, timeout=60) as c:
            while not self.stop.is_set():
                try:
                    result = c.generate(PROMPT, adapter="good@prod", max_new_tokens=4)
                    assert self.expected is None or result.token_ids == self.expected, "answer changed"
                    self.done += 1
                except (AssertionError, LoradockError) as e:
                    self.errors.append(e)

    def __enter__(self) -> Background:
        with Client(self.address, timeout=60) as c:
            self.expected = c.generate(PROMPT, adapter="good@prod", max_new_tokens=4).token_ids
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(60)


def _expect(client: Client, ref: str, code: grpc.StatusCode, words: str) -> str:
    for call in (lambda: client.generate(PROMPT, adapter=ref, max_new_tokens=3),
                 lambda: list(client.stream(PROMPT, adapter=ref, max_new_tokens=3))):
        with pytest.raises(LoradockError) as info:
            call()
        assert info.value.code == code, info.value
        assert words in info.value.details, info.value.details
    return info.value.details


def test_registry_files_corrupted_or_deleted_under_a_running_server(rel_server, rel_home, figures):
    registry = Registry(rel_home)
    corrupt = registry.resolve("victim-corrupt").path / WEIGHTS
    original = corrupt.read_bytes()
    with Background(rel_server.address) as background, Client(rel_server.address, timeout=60) as client:
        before = client.generate(PROMPT, adapter="victim-corrupt", max_new_tokens=4)
        assert client.unload_adapter("victim-corrupt")  # forget the verified copy in memory

        corrupt.chmod(0o644)
        corrupt.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))  # one flipped bit pattern
        flipped = _expect(client, "victim-corrupt", grpc.StatusCode.FAILED_PRECONDITION,
                          "no longer matches its manifest")
        corrupt.unlink()
        missing = _expect(client, "victim-corrupt", grpc.StatusCode.FAILED_PRECONDITION, f"{WEIGHTS}: missing")
        corrupt.write_bytes(original)  # repaired: served again, same answer
        again = client.generate(PROMPT, adapter="victim-corrupt", max_new_tokens=4)
        assert again.token_ids == before.token_ids

        shutil.rmtree(registry.resolve("victim-delete").path)  # never loaded, now gone
        gone = _expect(client, "victim-delete", grpc.StatusCode.NOT_FOUND, "victim-delete")
        with pytest.raises(LoradockError) as info:
            client.load_adapter("victim-delete")
        assert info.value.code == grpc.StatusCode.NOT_FOUND
        time.sleep(0.5)  # the background clients keep going a little longer
    assert not background.errors, background.errors[:3]
    assert background.done > 0
    figures(other_requests_ok=background.done, other_errors=len(background.errors))
    print(f"  corrupt: {flipped[:90]}\n  missing: {missing[:90]}\n  deleted: {gone[:90]}")


@pytest.fixture(scope="module")
def own_home(tiny_base, session_home: Path, templates, tmp_path_factory) -> Path:
    """A registry with three adapters and an alias, for servers this module kills."""
    root = tmp_path_factory.mktemp("kill-home") / "home"
    root.mkdir()
    (root / "bases").symlink_to(session_home / "bases")
    registry = Registry(root)
    registry.publish(templates["qv"], "one", base=TINY_BASE, aliases=["prod"])
    registry.publish(templates["all"], "two", base=TINY_BASE)
    registry.publish(derive_adapter(templates["all"], root.parent / "three", seed=3), "two", base=TINY_BASE)
    return root


@pytest.fixture
def spawned():
    """Start servers with `spawned(home, log)`; any still running when the test ends is killed."""
    procs = []

    def start(home: Path, log: Path):
        procs.append(start_server(home, log))
        return procs[-1]

    yield start
    for p in procs:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()


def _tree(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under the registry root (bases excluded)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((root / "adapters").rglob("*")) if p.is_file()}


ASKS = [("one", PROMPT), ("one@prod", "Hello there"), ("two@1", PROMPT), ("two", "Numbers: one, two,"), ("", PROMPT)]


def _answers(address: str) -> list[tuple]:
    with Client(address, timeout=60) as c:
        return [(r.token_ids, r.adapter.ref if r.adapter else None)
                for r in (c.generate(p, adapter=ref, max_new_tokens=8) for ref, p in ASKS)]


def test_sigkill_then_restart_on_the_same_registry(own_home: Path, tmp_path: Path, spawned, figures):
    first = spawned(own_home, tmp_path / "first.log")
    answers = _answers(first.address)
    tree = _tree(own_home)
    outcomes: list[str] = []  # of streams that were running when the server died

    def stream_until_killed(ref: str) -> None:
        with Client(first.address, timeout=60) as c:
            while True:
                try:
                    n = sum(1 for _ in c.stream(PROMPT, adapter=ref, max_new_tokens=200, ignore_eos=True))
                    assert n == 200
                except LoradockError as e:
                    outcomes.append(e.code.name)
                    return

    threads = [threading.Thread(target=stream_until_killed, args=(ref,)) for ref in ("one", "two", "two@1", "")]
    for t in threads:
        t.start()
    time.sleep(1.0)
    first.proc.send_signal(signal.SIGKILL)
    assert first.proc.wait(30) == -signal.SIGKILL
    for t in threads:  # in-flight clients get an error, not a hang
        t.join(30)
        assert not t.is_alive()
    # grpc reports a peer killed mid-stream as UNAVAILABLE ("Socket closed") or UNKNOWN ("Stream removed")
    assert len(outcomes) == len(threads) and set(outcomes) <= {"UNAVAILABLE", "UNKNOWN"}, outcomes

    registry = Registry(own_home)
    assert _tree(own_home) == tree  # the server never writes the registry
    assert all(r.ok for r in registry.verify()), registry.verify()
    assert registry.aliases("one") == {"prod": 1}

    started = time.monotonic()
    second = spawned(own_home, tmp_path / "second.log")
    restart_s = time.monotonic() - started
    try:
        assert _answers(second.address) == answers
    finally:
        assert second.terminate() == 0, second.log()
    figures(restart_s=round(restart_s, 1), files_checked=len(tree), answers_equal=len(answers))


def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(own_home: Path, tmp_path: Path, spawned, figures):
    server = spawned(own_home, tmp_path / "serve.log")
    # Long enough that the streams are still generating while the late calls arrive (the tiny
    # base decodes 4 sequences at a few ms per step; unread tokens wait in grpc's buffers).
    total, refs = 1600, ["one", "two", "two@1", ""]
    clients = [Client(server.address, timeout=120) for _ in refs]
    streams = [c.stream(PROMPT, adapter=ref, max_new_tokens=total, ignore_eos=True)
               for c, ref in zip(clients, refs, strict=True)]
    firsts = [iter(s) for s in streams]
    received = [[next(it)] for it in firsts]
    server.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "draining" in server.log(), what="the server logging 'draining'")
    refused = 0
    with Client(server.address, timeout=10) as late:
        for call in (lambda: late.generate(PROMPT, adapter="one", max_new_tokens=2),
                     lambda: list(late.stream(PROMPT, adapter="one", max_new_tokens=2)),
                     lambda: late.load_adapter("two")):
            with pytest.raises(LoradockError) as info:
                call()
            assert info.value.code == grpc.StatusCode.UNAVAILABLE, info.value
            refused += 1
    still_running = "stopped" not in server.log()
    with ThreadPoolExecutor(len(refs)) as pool:  # read the rest of every stream concurrently
        rests = list(pool.map(list, firsts))
    for got, rest, stream in zip(received, rests, streams, strict=True):
        assert len(got) + len(rest) == total
        assert stream.result.completion_tokens == total
    assert still_running
    assert server.proc.wait(60) == 0, server.log()
    for c in clients:
        c.close()
    figures(in_flight=len(refs), tokens_each=total, refused_during_drain=refused)


def test_publishers_killed_mid_way_leave_no_partial_version(rel_server, rel_home, templates, tmp_path, figures):
    """SIGKILL a publisher at random points while the server reads the same registry: every
    visible version is whole and servable, and the server never sees a partial one."""
    registry = Registry(rel_home)
    rng = random.Random(7)
    kills = scaled(4)
    with Client(rel_server.address, timeout=60) as client:
        for attempt in range(kills):
            start = tmp_path / f"go{attempt}"
            start.touch()
            [proc] = run_publishers(rel_home, templates["qv"], "churned", 1, 1000, start)
            assert proc.stdout.readline().startswith("churned@")
            time.sleep(rng.uniform(0, 0.3))
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=30)
            versions = [v.version for v in registry.versions("churned")]
            assert versions == list(range(1, len(versions) + 1))
            assert all(r.ok for r in registry.verify() if r.ref.startswith("churned@"))
            latest = wait_for_latest(client, "churned", versions[-1])
            assert latest.completion_tokens == 2
            listed = {a.name for a in client.list_adapters()}
            assert "churned" in listed
    removed = registry.gc()
    assert not list((rel_home / "adapters" / ".staging").iterdir())
    figures(kills=kills, versions=len(registry.versions("churned")), gc_removed=len(removed))


def wait_for_latest(client: Client, name: str, version: int):
    """The server serves `name`'s newest version once it polled the registry."""
    deadline = time.monotonic() + 20
    while True:
        result = client.generate(PROMPT, adapter=name, max_new_tokens=2)
        if result.adapter.version == version or time.monotonic() > deadline:
            assert result.adapter.version == version
            return result
        time.sleep(0.05)
