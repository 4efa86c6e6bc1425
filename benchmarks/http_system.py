"""`loradock-http`: `loradock serve --no-grpc --http-port` in a child process (the same engine
flags as `loradock-grpc`), requests streamed over the OpenAI-compatible HTTP API by concurrent
client threads (`POST /v1/completions` with the prompt's token ids, `stream: true`, greedy,
EOS ignored); the reported peak RSS is the server's.

The client is plain `httpx` reading the server-sent events, not the `openai` package (a test
dependency): one streamed chunk per generated token, as the gRPC system gets one message each.
"""

from __future__ import annotations

import json
import resource
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx

from loradock.server_process import ServerProcess, free_port

from .job import Job
from .load import Progress
from .loradock_systems import drive_server, server_flags
from .metrics import RequestRecord
from .workload import BenchRequest


def stream_completion(http: httpx.Client, url: str, body: dict) -> Iterator[str]:
    """POST a streamed completion; yield each generated token's text as its chunk arrives."""
    with http.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.read().decode(errors='replace')[:300]}")
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                return
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(chunk["error"].get("message", "error in the stream"))
            for choice in chunk["choices"]:
                if choice.get("finish_reason") is None:  # the last chunk only says why it ended
                    yield choice["text"]


def run_http(job: Job, progress: Progress, extra: dict) -> list[RequestRecord]:
    """The workload streamed over HTTP to a `loradock serve` child with the same engine settings."""
    http_port = free_port()
    base_url = f"http://127.0.0.1:{http_port}"

    def is_serving(_grpc_address: str) -> bool:
        try:
            return httpx.get(f"{base_url}/ready", timeout=2.0).status_code == 200
        except httpx.HTTPError:  # not listening yet
            return False

    with tempfile.TemporaryDirectory(prefix="loradock-bench-http-") as tmp:
        server = ServerProcess(Path(job.home), job.base, log_path=Path(tmp) / "serve.log", is_serving=is_serving,
                               extra_args=[*server_flags(job), "--no-grpc", "--http-port", str(http_port)])
        limits = httpx.Limits(max_connections=job.clients + 8, max_keepalive_connections=job.clients + 8)
        with server, httpx.Client(limits=limits, timeout=httpx.Timeout(600.0)) as http:
            url = f"{base_url}/v1/completions"

            def send(request: BenchRequest) -> Iterator[str]:
                model = "" if request.adapter is None else job.adapter_refs[request.adapter]
                return stream_completion(http, url, {
                    "model": model, "prompt": list(request.prompt_token_ids), "max_tokens": request.max_new_tokens,
                    "temperature": 0, "ignore_eos": True, "stream": True})

            records = drive_server(job, server.pid, send, progress, extra)
        # The server exited (SIGTERM, drained) and was waited for: its peak RSS is in RUSAGE_CHILDREN.
        extra["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return records
