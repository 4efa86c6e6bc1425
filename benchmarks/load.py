"""Drive a streaming system with real concurrency: a closed loop of C client threads, or
an open loop issuing each request at its Poisson arrival time.

A sender turns one request into an iterator of token events (the in-process engine's
handle, or a gRPC stream); `timed_stream` stamps when the first and the last token
arrive, on the client's side, so both loradock systems are timed the same way.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

from .metrics import RequestRecord
from .workload import BenchRequest

Sender = Callable[[BenchRequest], Iterable[object]]
Progress = Callable[[int], None]

MAX_OPEN_LOOP_THREADS = 512


def timed_stream(request: BenchRequest, issued_s: float, send: Sender) -> RequestRecord:
    """Consume one request's token stream; any exception becomes the record's error."""
    first: float | None = None
    count = 0
    error = None
    try:
        for _ in send(request):
            if first is None:
                first = time.perf_counter()
            count += 1
    except Exception as e:  # the system's failure is a measured outcome, not a harness crash
        error = f"{type(e).__name__}: {e}"
    if error is None and count != request.max_new_tokens:
        error = f"expected {request.max_new_tokens} tokens (EOS ignored), got {count}"
    return RequestRecord(request.index, request.adapter, len(request.prompt_token_ids), count,
                         issued_s, first, time.perf_counter(), error)


def closed_loop(requests: Sequence[BenchRequest], clients: int, send: Sender,
                progress: Progress = lambda n: None) -> list[RequestRecord]:
    """`clients` threads, each issuing the next request as soon as its previous one finished."""
    pending = iter(requests)
    lock = threading.Lock()
    records: list[RequestRecord] = []

    def client() -> None:
        while True:
            with lock:
                request = next(pending, None)
            if request is None:
                return
            record = timed_stream(request, time.perf_counter(), send)
            with lock:
                records.append(record)
            progress(1)

    threads = [threading.Thread(target=client, name=f"bench-client-{i}") for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(records, key=lambda r: r.index)


def open_loop(requests: Sequence[BenchRequest], send: Sender,
              progress: Progress = lambda n: None) -> list[RequestRecord]:
    """Issue each request at `start + arrival_s`, however many are still running.

    A request's clock starts at its scheduled arrival, so a late dispatch counts against
    the system (as it would for a real user), not in its favour.
    """
    start = time.perf_counter()
    workers = min(MAX_OPEN_LOOP_THREADS, len(requests))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bench-arrival") as pool:
        futures = []
        for request in sorted(requests, key=lambda r: r.arrival_s):
            due = start + request.arrival_s
            time.sleep(max(0.0, due - time.perf_counter()))
            future = pool.submit(timed_stream, request, due, send)
            future.add_done_callback(lambda _: progress(1))
            futures.append(future)
        records = [f.result() for f in futures]
    return sorted(records, key=lambda r: r.index)


def drive(requests: Sequence[BenchRequest], clients: int, send: Sender,
          progress: Progress = lambda n: None) -> list[RequestRecord]:
    """Open loop when the requests carry arrival times, else a closed loop of `clients`."""
    if requests and requests[0].arrival_s is not None:
        return open_loop(requests, send, progress)
    return closed_loop(requests, clients, send, progress)
