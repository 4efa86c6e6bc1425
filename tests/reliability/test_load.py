"""Load: 50 adapters, 64 concurrent streaming clients, hundreds of requests with power-law
popularity, through a real server. No errors, every answer from the right adapter, and the
server's memory flat after warm-up. Overload gets RESOURCE_EXHAUSTED instead of a pile-up."""

from __future__ import annotations

import queue
import random
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
from loradock.registry import Registry

from loradock.client import Client, LoradockError
from tests.conftest import TINY_BASE
from tests.reliability.conftest import TOKEN, derive_adapter, scaled
from tests.reliability.probes import engine_load, rss_mib
from tests.server.conftest import start_server

ADAPTERS = 50
CLIENTS = 64
REQUESTS = scaled(512)
WARMUP = 128  # requests before the memory baseline is taken
RSS_GROWTH_BOUND_MIB = 40.0  # after warm-up; independent of the request count
PROMPTS = ("The quick brown fox", "Once upon a time", "Numbers: one, two,", "Hello there, how", "def f(x):")
MAX_NEW = 12  # reference length; requests ask for 3..MAX_NEW tokens


@pytest.fixture(scope="module")
def load_server(tiny_base, session_home: Path, templates, tmp_path_factory):
    """50 adapters (ranks 4 and 8, attention-only and all-linear) behind a server with 8 device
    slots and room for 16 adapters in host memory, so popular adapters stay and rare ones churn."""
    work = tmp_path_factory.mktemp("load")
    home = work / "home"
    home.mkdir()
    (home / "bases").symlink_to(session_home / "bases")
    registry = Registry(home)
    for i in range(ADAPTERS):
        src = derive_adapter(templates["qv" if i % 2 else "all"], work / "src" / f"a{i}", seed=100 + i)
        registry.publish(src, f"a{i:02d}", base=TINY_BASE)
    proc = start_server(home, work / "serve.log", "--max-slots", "8", "--max-host-adapters", "16",
                        "--max-running", "64", "--metrics-port", "0")
    yield proc
    assert proc.terminate() == 0, proc.log()


def power_law_refs(n: int, rng: random.Random) -> list[str]:
    """`n` adapter names, adapter k drawn with probability proportional to 1/k (alpha = 1)."""
    names = [f"a{i:02d}" for i in range(ADAPTERS)]
    return rng.choices(names, weights=[1 / (k + 1) for k in range(ADAPTERS)], k=n)


def test_many_adapters_many_streaming_clients(load_server, figures):
    address, pid = load_server.address, load_server.proc.pid
    with Client(address, timeout=60) as c:  # each adapter's answer alone: the reference
        reference = {(f"a{i:02d}", p): c.generate(p, adapter=f"a{i:02d}", max_new_tokens=MAX_NEW,
                                                   ignore_eos=True).token_ids
                     for i in range(ADAPTERS) for p in PROMPTS[:1]}
    rng = random.Random(2024)
    jobs: queue.Queue = queue.Queue()
    for ref in power_law_refs(REQUESTS, rng):
        jobs.put((ref, rng.choice(PROMPTS[:1] if rng.random() < 0.5 else PROMPTS), rng.randint(3, MAX_NEW)))
    errors: list[str] = []
    done = Counter()
    finished = [0]
    lock = threading.Lock()
    rss_after_warmup: list[float] = []
    answers: dict[tuple[str, str], set] = {}

    def client_loop() -> None:
        with Client(address, timeout=120) as c:
            while True:
                try:
                    ref, prompt, n = jobs.get_nowait()
                except queue.Empty:
                    return
                try:
                    stream = c.stream(prompt, adapter=ref, max_new_tokens=n, ignore_eos=True)
                    events = list(stream)
                    result = stream.result
                    assert [e.index for e in events] == list(range(n)), "missing or reordered chunks"
                    assert "".join(e.text for e in events) == result.text
                    assert result.adapter.ref == f"{ref}@1", result.adapter
                    with lock:
                        answers.setdefault((ref, prompt), set()).add(result.token_ids[:3])
                        if (ref, prompt) in reference:
                            assert result.token_ids == reference[(ref, prompt)][:n], f"{ref} answered wrongly"
                except (AssertionError, LoradockError) as e:
                    with lock:
                        errors.append(f"{ref}: {e}")
                with lock:
                    done[ref] += 1
                    finished[0] += 1
                    if finished[0] == WARMUP:
                        rss_after_warmup.append(rss_mib(pid))

    samples: list[float] = []
    stop = threading.Event()

    def sample_rss() -> None:
        while not stop.is_set():
            if rss_after_warmup:
                samples.append(rss_mib(pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample_rss)
    sampler.start()
    started = time.monotonic()
    threads = [threading.Thread(target=client_loop) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    elapsed = time.monotonic() - started
    stop.set()
    sampler.join()
    final_rss = rss_mib(pid)

    assert not errors, errors[:5]
    assert sum(done.values()) == REQUESTS
    assert len(done) >= 30, "the power law should still reach most adapters"
    # one answer per (adapter, prompt): no request got another adapter's weights
    assert all(len(v) == 1 for v in answers.values())
    assert engine_load(load_server.metrics_url) == (0, 0, 0)
    growth = max([*samples, final_rss]) - rss_after_warmup[0]
    top = done.most_common(1)[0]
    figures(requests=REQUESTS, clients=CLIENTS, adapters_hit=len(done), errors=len(errors),
            req_per_s=round(REQUESTS / elapsed, 1), top_adapter_share=round(top[1] / REQUESTS, 2),
            rss_after_warmup_mib=round(rss_after_warmup[0], 1), rss_growth_mib=round(growth, 1),
            rss_samples=len(samples))
    assert growth <= RSS_GROWTH_BOUND_MIB, f"server RSS grew {growth:.1f} MiB after warm-up"


def test_overload_answers_resource_exhausted(guarded_server, figures):
    """One running place and two queue places; 16 clients at once: the excess is refused at
    once with RESOURCE_EXHAUSTED, the waiting queue never exceeds its bound, the rest finish."""
    clients = scaled(16)
    barrier = threading.Barrier(clients)
    outcomes: list[str] = []
    waiting_seen: list[float] = []
    refused_after: list[float] = []
    stop = threading.Event()

    def one(i: int) -> None:
        with Client(guarded_server.address, token=TOKEN, tls=guarded_server.tls_cert, timeout=120) as c:
            barrier.wait()
            t0 = time.monotonic()
            try:
                r = c.generate("Overload", adapter="good@prod", max_new_tokens=60, ignore_eos=True)
                outcomes.append("OK" if r.completion_tokens == 60 else "SHORT")
            except LoradockError as e:
                outcomes.append(e.code.name)
                if e.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    assert "queue" in e.details.lower()
                    refused_after.append(time.monotonic() - t0)

    def watch() -> None:
        while not stop.is_set():
            waiting_seen.append(engine_load(guarded_server.metrics_url)[1])
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    stop.set()
    watcher.join()
    counts = Counter(outcomes)
    assert set(counts) <= {"OK", "RESOURCE_EXHAUSTED"}, counts
    # The two queue places always take a request; the running place takes a third only when the
    # loop admits the first before the burst's third arrives (a race, lost once in a loaded run).
    assert counts["RESOURCE_EXHAUSTED"] >= 1 and counts["OK"] >= 2
    assert max(waiting_seen) <= 2
    assert max(refused_after) < 5.0  # refused at once, not after waiting
    with Client(guarded_server.address, token=TOKEN, tls=guarded_server.tls_cert, timeout=60) as c:
        assert c.generate("After", adapter="good@prod", max_new_tokens=2).completion_tokens == 2
    figures(clients=clients, ok=counts["OK"], resource_exhausted=counts["RESOURCE_EXHAUSTED"],
            max_waiting=max(waiting_seen), slowest_refusal_s=round(max(refused_after), 3))
