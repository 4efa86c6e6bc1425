"""Python client of a `loradock serve` runtime.

    from loradock.client import Client

    with Client("127.0.0.1:50051") as client:
        result = client.generate("What is LoRA?", adapter="medical@prod", max_new_tokens=32)
        print(result.text, result.adapter)          # ResolvedAdapter(name, version, digest)
        for event in client.stream([{"role": "user", "content": "Hi"}], adapter="support"):
            print(event.text, end="", flush=True)

Results are plain dataclasses (`GenerationResult`, `TokenEvent`, `AdapterView`, ...),
never protobuf. Every failure raises `LoradockError` whose `.code` is the gRPC status
code (`grpc.StatusCode.NOT_FOUND`, ...) and whose `.details` says what was wrong.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loradock.proto.loradock.v1 import runtime_pb2 as pb
from loradock.proto.loradock.v1 import runtime_pb2_grpc as pb_grpc
from loradock.runtime.errors import InvalidRequestError
from loradock.runtime.server import convert
from loradock.runtime.server.views import AdapterView, LoadResult, ServerInfo
from loradock.runtime.types import (
    ChatMessage,
    GenerationRequest,
    GenerationResult,
    ResolvedAdapter,
    SamplingParams,
    TokenEvent,
)

DEFAULT_ADDRESS = "127.0.0.1:50051"
MessageLike = ChatMessage | Mapping[str, str] | tuple[str, str]
# Codes after which retrying the same call on this connection is pointless.
FATAL_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED,
                         grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INTERNAL})

__all__ = [
    "DEFAULT_ADDRESS",
    "FATAL_CODES",
    "AdapterView",
    "ChatMessage",
    "Client",
    "GenerationResult",
    "LoadResult",
    "LoradockError",
    "ResolvedAdapter",
    "SamplingParams",
    "ServerInfo",
    "Stream",
    "TokenEvent",
]


class LoradockError(Exception):
    """A call failed; `code` is the gRPC status code, `details` the server's explanation."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def from_rpc(cls, error: grpc.RpcError) -> LoradockError:
        return cls(error.code(), error.details() or "")


def _message(m: MessageLike) -> ChatMessage:
    if isinstance(m, ChatMessage):
        return m
    if isinstance(m, Mapping):
        return ChatMessage(role=m["role"], content=m["content"])
    role, content = m
    return ChatMessage(role=role, content=content)


def build_request(
    prompt: str | Sequence[MessageLike] | None = None,
    *,
    adapter: str | None = None,
    prompt_token_ids: Sequence[int] | None = None,
    sampling: SamplingParams | None = None,
    **sampling_fields: Any,
) -> GenerationRequest:
    """A GenerationRequest from `prompt` (a string, or chat messages) or `prompt_token_ids`.

    Sampling comes from `sampling` or from SamplingParams field names given as keywords
    (max_new_tokens, temperature, top_p, top_k, seed, stop, ignore_eos, logprobs).
    """
    if sampling is not None and sampling_fields:
        raise TypeError("give either sampling= or sampling keywords, not both")
    if sampling is None:
        if "stop" in sampling_fields:
            sampling_fields["stop"] = tuple(sampling_fields["stop"])
        sampling = SamplingParams(**sampling_fields)
    is_chat = prompt is not None and not isinstance(prompt, str)
    return GenerationRequest(
        adapter=adapter or None,
        prompt=None if is_chat else prompt,
        messages=tuple(_message(m) for m in prompt) if is_chat else (),  # type: ignore[union-attr]
        prompt_token_ids=tuple(prompt_token_ids) if prompt_token_ids is not None else None,
        sampling=sampling,
    )


class Stream:
    """Iterate for `TokenEvent`s as tokens are generated; `result` is set once the stream ends."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[TokenEvent]:
        try:
            for msg in self._call:
                item = convert.stream_item_from_proto(msg)
                if isinstance(item, GenerationResult):
                    self.result = item
                else:
                    yield item
        except grpc.RpcError as e:
            raise LoradockError.from_rpc(e) from None

    def text(self) -> Iterator[str]:
        """Only the text pieces (skipping empty ones)."""
        return (event.text for event in self if event.text)

    def cancel(self) -> None:
        """Stop generating; the server cancels the request at once."""
        self._call.cancel()


class Client:
    """A connection to a loradock runtime.

    `token` is sent as `authorization: Bearer <token>`; `tls` is None (plaintext), True
    (TLS with the system's root certificates) or a path to a PEM root certificate.
    `timeout` (seconds) applies to every call unless a call gives its own.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        token: str | None = None,
        tls: bool | str | Path | None = None,
        *,
        timeout: float | None = None,
        max_message_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes)]
        if tls:
            roots = None if tls is True else Path(tls).read_bytes()
            credentials = grpc.ssl_channel_credentials(root_certificates=roots)
            self._channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._stub = pb_grpc.RuntimeStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    # ---- generation ----

    def generate(
        self,
        prompt: str | Sequence[MessageLike] | None = None,
        *,
        adapter: str | None = None,
        prompt_token_ids: Sequence[int] | None = None,
        timeout: float | None = None,
        **sampling: Any,
    ) -> GenerationResult:
        """Generate a completion. `prompt` is a string (used verbatim) or chat messages
        (dicts, (role, content) pairs or ChatMessage) rendered with the chat template."""
        request = self._request(prompt, adapter, prompt_token_ids, sampling)
        response = self._call(self._stub.Generate, request, timeout)
        return convert.result_from_proto(response)

    def stream(
        self,
        prompt: str | Sequence[MessageLike] | None = None,
        *,
        adapter: str | None = None,
        prompt_token_ids: Sequence[int] | None = None,
        timeout: float | None = None,
        **sampling: Any,
    ) -> Stream:
        """Like `generate`, but returns a `Stream` of TokenEvents as they are produced."""
        request = self._request(prompt, adapter, prompt_token_ids, sampling)
        call = self._stub.GenerateStream(request, timeout=self._timeout(timeout), metadata=self._metadata)
        return Stream(call)

    @staticmethod
    def _request(prompt, adapter, prompt_token_ids, sampling: dict[str, Any]) -> pb.GenerateRequest:
        try:
            return convert.request_to_proto(
                build_request(prompt, adapter=adapter, prompt_token_ids=prompt_token_ids, **sampling)
            )
        except InvalidRequestError as e:  # caught before sending: same code the server would give
            raise LoradockError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None

    # ---- adapters and info ----

    def list_adapters(self, name: str | None = None) -> list[AdapterView]:
        """Adapters in the server's registry (or only `name`) with versions, aliases, residency."""
        response = self._call(self._stub.ListAdapters, pb.ListAdaptersRequest(name=name or ""))
        return [convert.adapter_view_from_proto(a) for a in response.adapters]

    def load_adapter(self, ref: str, *, pin: bool = False) -> LoadResult:
        """Load `ref` into a device slot now (pinned: never evicted until unloaded)."""
        return convert.load_result_from_proto(
            self._call(self._stub.LoadAdapter, pb.LoadAdapterRequest(adapter=ref, pin=pin))
        )

    def unload_adapter(self, ref: str) -> bool:
        """Drop `ref`'s version (and its pin) from the server's caches; False if it was not
        resident. FAILED_PRECONDITION while running requests use it."""
        response = self._call(self._stub.UnloadAdapter, pb.UnloadAdapterRequest(adapter=ref))
        return response.was_resident

    def info(self) -> ServerInfo:
        """The served base model, quantization, device and capacities."""
        return convert.info_from_proto(self._call(self._stub.GetInfo, pb.GetInfoRequest()))

    def health(self, service: str = "") -> str:
        """gRPC health status name: "SERVING", "NOT_SERVING", ... (needs no token)."""
        response = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_until_serving(self, timeout: float = 60.0) -> None:
        """Block until health reports SERVING; raises LoradockError(DEADLINE_EXCEEDED) after `timeout`."""
        request = health_pb2.HealthCheckRequest(service="")
        try:
            for response in self._health.Watch(request, timeout=timeout, wait_for_ready=True):
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError as e:
            raise LoradockError.from_rpc(e) from None
        raise LoradockError(grpc.StatusCode.UNAVAILABLE, f"{self.address} stopped before it was serving")

    # ---- plumbing ----

    def _timeout(self, timeout: float | None) -> float | None:
        return timeout if timeout is not None else self.timeout

    def _call(self, method, request, timeout: float | None = None):
        try:
            return method(request, timeout=self._timeout(timeout), metadata=self._metadata)
        except grpc.RpcError as e:
            raise LoradockError.from_rpc(e) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
