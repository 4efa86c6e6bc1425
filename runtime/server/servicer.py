"""The `loradock.v1.Runtime` servicer: convert -> engine -> convert, nothing else.

Errors become status codes through `status.status_for`; a client that cancels or
disconnects cancels its engine request at once (`context.add_callback`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
from loradock.proto.loradock.v1 import runtime_pb2 as pb
from loradock.proto.loradock.v1 import runtime_pb2_grpc as pb_grpc
from loradock.registry import InvalidNameError, Registry, parse_ref
from loradock.runtime.metrics import UNRESOLVED, Metrics
from loradock.runtime.server import catalog, convert
from loradock.runtime.server.status import status_for
from loradock.runtime.types import FinishReason, GenerationResult

log = logging.getLogger(__name__)

NOT_READY = "the base model is still loading; retry when gRPC health reports SERVING"


@dataclass
class _Outcome:
    """What a generation RPC produced, for the metrics."""

    result: GenerationResult | None = None


class RuntimeServicer(pb_grpc.RuntimeServicer):
    """Serves the Runtime API from one engine and the registry it reads."""

    def __init__(self, engine, registry: Registry, metrics: Metrics | None = None) -> None:
        self._engine = engine
        self._registry = registry
        self._metrics = metrics or Metrics()

    # ---- generation ----

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> pb.GenerateResponse:
        with self._generation(context, "Generate", request.adapter) as outcome:
            handle = self._submit(request, context)
            outcome.result = handle.result()
            return convert.result_to_proto(outcome.result)

    def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateStreamResponse]:
        with self._generation(context, "GenerateStream", request.adapter) as outcome:
            handle = self._submit(request, context)
            for event in handle:
                yield convert.event_to_proto(event)
            outcome.result = handle.result()
            yield convert.final_to_proto(outcome.result)

    def _submit(self, request: pb.GenerateRequest, context: grpc.ServicerContext):
        handle = self._engine.submit(convert.request_from_proto(request))
        # Runs when the RPC ends for any reason; cancelling a finished request does nothing.
        if not context.add_callback(handle.cancel):
            handle.cancel()  # the client was gone before we got here
        return handle

    @contextmanager
    def _generation(self, context: grpc.ServicerContext, method: str, ref: str) -> Iterator[_Outcome]:
        self._require_ready(context)
        outcome = _Outcome()
        try:
            yield outcome
        except GeneratorExit:  # the stream's consumer went away: the client cancelled
            self._metrics.observe(_adapter_label(ref, outcome), method, "CANCELLED")
            raise
        except Exception as exc:
            code, details = self._status(exc)
            self._metrics.observe(_adapter_label(ref, outcome, code), method, code.name)
            context.abort(code, details)
        else:
            # A unary call whose client left still returns the engine's CANCELLED result.
            cancelled = outcome.result is not None and outcome.result.finish_reason is FinishReason.CANCELLED
            self._metrics.observe(_adapter_label(ref, outcome), method, "CANCELLED" if cancelled else "OK",
                                  outcome.result)

    # ---- adapters and info ----

    def ListAdapters(self, request: pb.ListAdaptersRequest, context: grpc.ServicerContext) -> pb.ListAdaptersResponse:
        self._require_ready(context)  # residency comes from the engine's caches
        with self._errors(context):
            views = catalog.list_adapters(self._registry, self._engine, request.name or None)
            return pb.ListAdaptersResponse(adapters=[convert.adapter_view_to_proto(v) for v in views])

    def LoadAdapter(self, request: pb.LoadAdapterRequest, context: grpc.ServicerContext) -> pb.LoadAdapterResponse:
        self._require_ready(context)
        with self._errors(context):
            result = catalog.load_adapter(self._engine, _require_ref(request.adapter), pin=request.pin)
            return convert.load_result_to_proto(result)

    def UnloadAdapter(
        self, request: pb.UnloadAdapterRequest, context: grpc.ServicerContext
    ) -> pb.UnloadAdapterResponse:
        self._require_ready(context)
        with self._errors(context):
            was_resident = catalog.unload_adapter(self._engine, _require_ref(request.adapter))
            return pb.UnloadAdapterResponse(was_resident=was_resident)

    def GetInfo(self, request: pb.GetInfoRequest, context: grpc.ServicerContext) -> pb.GetInfoResponse:
        self._require_ready(context)
        with self._errors(context):
            return convert.info_to_proto(catalog.server_info(self._engine))

    # ---- plumbing ----

    def _require_ready(self, context: grpc.ServicerContext) -> None:
        if not self._engine.ready:
            context.abort(grpc.StatusCode.UNAVAILABLE, NOT_READY)

    @contextmanager
    def _errors(self, context: grpc.ServicerContext) -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            context.abort(*self._status(exc))

    @staticmethod
    def _status(exc: Exception) -> tuple[grpc.StatusCode, str]:
        code, details = status_for(exc)
        if code is grpc.StatusCode.INTERNAL:
            log.error("bug while serving a request", exc_info=exc)
        return code, details


def _require_ref(ref: str) -> str:
    if not ref.strip():
        raise InvalidNameError("adapter: give a reference like 'medical@prod' (empty means the base model)")
    return ref


def _adapter_label(ref: str, outcome: _Outcome, code: grpc.StatusCode | None = None) -> str:
    """The metrics label: the served adapter's name, else the requested name when it names
    a real adapter; garbage references share one label so they cannot flood the metrics."""
    if outcome.result is not None:
        return outcome.result.adapter.name if outcome.result.adapter else ""
    if not ref:
        return ""
    if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
        return UNRESOLVED
    try:
        return parse_ref(ref).name
    except InvalidNameError:
        return UNRESOLVED
