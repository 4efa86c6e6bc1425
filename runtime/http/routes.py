"""The FastAPI application: the OpenAI routes, runtime adapter management, health, readiness
and metrics, behind the gate (`gate.py`), with every error in OpenAI's shape; the web console
(`console/`) under /ui."""

from __future__ import annotations

import time
from importlib import metadata
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from loradock.registry import (
    IncompatibleBaseError,
    InvalidAdapterError,
    InvalidNameError,
    NotFoundError,
    Registry,
)
from loradock.registry.fsutil import sha256_file
from loradock.registry.validate import ADAPTER_FILES
from loradock.runtime.lifecycle import EdgeState
from loradock.runtime.metrics import CONTENT_TYPE, Metrics
from starlette.exceptions import HTTPException

from . import convert
from .console import Console
from .errors import (
    ApiError,
    bad_request,
    draining,
    error_for,
    http_error,
    loading,
    validation_error,
)
from .gate import Gate
from .generation import Generation
from .models import ModelCatalog
from .openapi import contract
from .schemas import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    Health,
    LoadLoraAdapterRequest,
    LoraAdapterLoaded,
    LoraAdapterUnloaded,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    UnloadLoraAdapterRequest,
    VersionInfo,
)

ERRORS = {code: {"model": ErrorResponse} for code in (400, 404, 503)}  # contract() adds 401, 403, 413
QUEUED = {**ERRORS, 429: {"model": ErrorResponse}}  # generation: the queue may be full
UPDATES_OFF = ("runtime adapter updates are off; start the server with --allow-adapter-updates "
               "(or publish with `loradock adapters publish`: the server sees new versions by itself)")


ROUTE_KEY_HEADER = "X-Loradock-Route-Key"


def _route_key(request: Request, body) -> str | None:
    """What keeps a caller on one version of a canary: the header, else OpenAI's `user`."""
    return request.headers.get(ROUTE_KEY_HEADER) or body.user or None


def _version() -> str:
    try:
        return metadata.version("loradock")
    except metadata.PackageNotFoundError:
        return "unknown"


def create_app(
    engine,
    registry: Registry,
    *,
    metrics: Metrics,
    state: EdgeState | None = None,
    auth_token: str | None = None,
    allow_adapter_updates: bool = False,
    max_body_bytes: int | None = None,
) -> FastAPI:
    """The HTTP edge over `engine` (started or not: API calls answer 503 until it is ready)."""
    state = state or EdgeState()
    catalog = ModelCatalog(engine, registry)
    generation = Generation(engine, catalog, metrics)
    app = FastAPI(title="loradock", version=_version(),
                  summary="OpenAI-compatible API: every LoRA adapter version in the registry is a model.")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        return validation_error(exc).response()

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> Response:
        return http_error(exc.status_code, str(exc.detail), exc.headers).response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> Response:
        return error_for(exc).response()

    # ---- OpenAI ----

    @app.get("/v1/models", response_model=ModelList, responses={503: ERRORS[503]})
    def list_models() -> ModelList:
        """The base and every adapter reference: `name`, each `name@alias`, each `name@N`."""
        return ModelList(data=catalog.cards())

    @app.get("/v1/models/{model:path}", response_model=ModelCard, responses=ERRORS)
    def get_model(model: str) -> ModelCard:
        return catalog.card(model)

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=QUEUED)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        """Chat completion; with `stream: true`, server-sent `chat.completion.chunk`s, then `[DONE]`."""
        return await generation.run(request, body.model, lambda m: convert.chat_plan(body, m),
                                    chat=True, stream=bool(body.stream), route_key=_route_key(request, body))

    @app.post("/v1/completions", response_model=Completion, responses=QUEUED)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        """Text completion of a prompt (text or token ids, one or several)."""
        return await generation.run(request, body.model, lambda m: convert.completion_plan(body, m),
                                    chat=False, stream=bool(body.stream), route_key=_route_key(request, body))

    # ---- runtime adapter management (vLLM's routes) ----

    @app.post("/v1/load_lora_adapter", response_model=LoraAdapterLoaded, responses=ERRORS)
    def load_lora_adapter(body: LoadLoraAdapterRequest) -> LoraAdapterLoaded:
        """Publish the PEFT directory `lora_path` (an absolute path on the server) as the next
        version of `lora_name`, unless a version of that name already holds these very files,
        then load it into a device slot."""
        if not allow_adapter_updates:
            raise ApiError(403, UPDATES_OFF, type="permission_error", code="adapter_updates_disabled",
                           canonical="PERMISSION_DENIED")
        path = Path(body.lora_path)
        if not path.is_absolute():
            raise bad_request("lora_path", f"{body.lora_path!r} is relative; give an absolute path on the server "
                                           "(a relative one would depend on where the server was started)")
        if not path.is_dir():
            raise bad_request("lora_path", f"{body.lora_path!r} is not a directory on the server")
        hashes = {rel: sha256_file(path / rel) for rel in ADAPTER_FILES if (path / rel).is_file()}
        holding: set[str] = set()  # versions found holding exactly these files

        def same_files(v) -> bool:
            if hashes and all(v.manifest["files"].get(rel, {}).get("sha256") == h for rel, h in hashes.items()):
                holding.add(v.ref)
            return v.ref in holding

        try:
            version = registry.publish(path, body.lora_name, base=engine.info().base_name, reuse=same_files)
        except InvalidNameError as e:
            raise bad_request("lora_name", str(e)) from None
        except (InvalidAdapterError, IncompatibleBaseError, NotFoundError) as e:
            raise bad_request("lora_path", str(e), code="invalid_adapter") from None
        start = time.perf_counter()
        try:
            engine.load_adapter(version.ref)
        except Exception as e:
            raise error_for(e, model=version.ref) from None
        return LoraAdapterLoaded(id=version.ref, lora_name=version.name, version=version.version,
                                 digest=version.digest, load_ms=(time.perf_counter() - start) * 1000,
                                 message=f"loaded {version.ref}, which already holds these files"
                                 if version.ref in holding else f"published and loaded {version.ref}")

    @app.post("/v1/unload_lora_adapter", response_model=LoraAdapterUnloaded, responses=ERRORS)
    def unload_lora_adapter(body: UnloadLoraAdapterRequest) -> LoraAdapterUnloaded:
        """Drop the version `lora_name` means now from the engine's caches (the registry keeps
        it; the next request for it loads it again)."""
        if not allow_adapter_updates:
            raise ApiError(403, UPDATES_OFF, type="permission_error", code="adapter_updates_disabled",
                           canonical="PERMISSION_DENIED")
        try:
            served = catalog.resolve(body.lora_name)
        except ApiError as e:
            e.param = "lora_name"
            raise
        if served.ref is None:
            raise bad_request("lora_name", f"{body.lora_name!r} is the base model, which stays loaded")
        try:
            was_resident = engine.unload_adapter(served.ref)
        except Exception as e:
            raise error_for(e, model=served.ref) from None
        return LoraAdapterUnloaded(id=served.ref, was_resident=was_resident,
                                   message=f"unloaded {served.ref}" if was_resident else f"{served.ref} was not loaded")

    # ---- vLLM's tokenizer routes ----

    @app.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS)
    def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        """The token ids of a text or of chat messages (rendered with the chat template)."""
        catalog.resolve(body.model)  # 404 for a model not served here
        try:
            tokens = engine.tokenize(convert.tokenize_request(body))
        except Exception as e:
            raise error_for(e, model=body.model, prompt_field="messages" if body.messages else "prompt") from None
        return TokenizeResponse(count=len(tokens), max_model_len=engine.info().max_model_len, tokens=tokens)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS)
    def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        catalog.resolve(body.model)
        try:
            return DetokenizeResponse(prompt=engine.detokenize(body.tokens))
        except Exception as e:
            raise error_for(e, model=body.model, prompt_field="tokens") from None

    @app.get("/version", response_model=VersionInfo)
    def version() -> VersionInfo:
        return VersionInfo(version=_version())

    # ---- probes (no token needed) ----

    @app.get("/health", response_model=Health)
    def health() -> Health:
        """Liveness: 200 while the process answers, with what it is doing."""
        status = "draining" if state.draining else "serving" if engine.ready else "loading"
        return Health(status=status)

    @app.get("/ready", response_model=Health, responses={503: {"model": ErrorResponse}})
    def ready() -> Health:
        """Readiness: 200 once the engine is warm, 503 while loading or draining."""
        if state.draining:
            raise draining()
        if not engine.ready:
            raise loading()
        return Health(status="serving")

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}}}})
    def prometheus() -> Response:
        """Prometheus text exposition (the same page as --metrics-port)."""
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    app.state.console = Console(registry, engine=engine, auth_token=auth_token, allow_updates=allow_adapter_updates)
    app.state.console.mount(app)
    app.add_middleware(Gate, engine=engine, state=state, metrics=metrics, auth_token=auth_token,
                       max_body_bytes=max_body_bytes)
    chunk = ChatCompletionChunk.model_json_schema(ref_template="#/components/schemas/{model}")
    contract(app, {"ChatCompletionChunk": {k: v for k, v in chunk.items() if k != "$defs"}, **chunk.get("$defs", {})},
             vocab_size=lambda: getattr(engine.info(), "vocab_size", None) if engine.ready else None)
    return app
