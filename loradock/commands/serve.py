"""`loradock serve`: run the gRPC runtime for one base model and every adapter in the registry.

The engine's capacity flags are generated from `EngineConfig`'s fields and docstrings,
so the CLI cannot drift from the engine.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
from pathlib import Path

from loradock.errors import UserError
from loradock.registry.readonly import serving_registry
from loradock.runtime import config as engine_config
from loradock.runtime.config import EngineConfig

log = logging.getLogger(__name__)

# Fields whose values come from a fixed list, and the engine's own list of them.
CHOICES = {
    "quantize": engine_config.QUANTIZATIONS,
    "device": engine_config.DEVICES,
    "dtype": engine_config.DTYPES,
    "compute_dtype": engine_config.DTYPES,
    "lora_ops": engine_config.LORA_OPS,
    "attention": engine_config.ATTENTION_BACKENDS,
    "compile": engine_config.COMPILE_MODES,
    "async_scheduling": engine_config.ASYNC_SCHEDULING_MODES,
    "tool_call_parser": engine_config.TOOL_CALL_PARSERS,
}
_TYPES = {"int": int, "float": float, "str": str}
_SIZE = re.compile(r"(?i)^\s*(\d+(?:\.\d+)?)\s*(|b|k|kb|kib|m|mb|mib|g|gb|gib)\s*$")
_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024**2, "mb": 1000**2,
          "mib": 1024**2, "g": 1024**3, "gb": 1000**3, "gib": 1024**3}


def byte_size(text: str) -> int:
    """Parse `123`, `512MiB`, `2G`, `1.5GB` into bytes."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (examples: 1048576, 512MiB, 2GiB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineConfig field (except `base`), typed and documented from the field."""
    group = parser.add_argument_group("engine", "capacities and model loading (EngineConfig)")
    docs = EngineConfig.field_docs()
    for field in dataclasses.fields(EngineConfig):
        if field.name == "base":
            continue
        if str(field.type) == "bool":
            group.add_argument("--" + field.name.replace("_", "-"), dest=field.name,
                               action=argparse.BooleanOptionalAction, default=field.default,
                               help=f"{docs[field.name]} (default: {field.default})")
            continue
        # Annotations are strings here (`from __future__ import annotations`): "int", "int | None".
        kind = byte_size if field.name.endswith("_bytes") else _TYPES[str(field.type).removesuffix(" | None")]
        group.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=field.name,
            type=kind,
            choices=CHOICES.get(field.name),
            default=field.default,
            help=f"{docs[field.name]} (default: {field.default})",
        )


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "serve",
        help="serve adapters from one base model over gRPC and/or an OpenAI-compatible HTTP API",
        description="Load one base model (quantized by default) and serve every adapter in the "
        "registry over gRPC (service loradock.v1.Runtime, plus grpc.health.v1 and reflection) and, "
        "with --http-port, over an OpenAI-compatible HTTP API (/v1/models, /v1/chat/completions, "
        "/v1/completions; every adapter reference is a model), both from one engine. "
        "Adapters are loaded on demand and swapped without a restart; alias moves and new "
        "versions are picked up while running. Logs 'serving on HOST:PORT' (gRPC) and 'serving "
        "HTTP on URL' once warm. SIGTERM or Ctrl-C drains: new requests get UNAVAILABLE (HTTP 503), "
        "running ones finish, then it exits 0.",
    )
    parser.add_argument("--base", help="registry base name, or the model directory of a registry base "
                        "(default: the only base in the registry)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=50051,
                        help="gRPC port; 0 picks a free one (default: %(default)s)")
    parser.add_argument("--no-grpc", dest="grpc", action="store_false",
                        help="do not serve gRPC (then --http-port is required)")
    parser.add_argument("--http-port", type=int, metavar="PORT",
                        help="also serve the OpenAI-compatible HTTP API (with /health, /ready and "
                        "/metrics) on this port; 0 picks a free one")
    parser.add_argument("--allow-adapter-updates", action="store_true",
                        help="enable POST /v1/load_lora_adapter (publish a directory on this "
                        "machine into the registry as a new version, then load it) and "
                        "/v1/unload_lora_adapter on the HTTP API")
    parser.add_argument("--metrics-port", type=int,
                        help="serve Prometheus metrics at http://HOST:PORT/metrics (0 picks a free port)")
    parser.add_argument("--auth-token-file", type=Path, metavar="FILE",
                        help="require 'authorization: Bearer <token>' on every Runtime call and "
                        "every /v1/ HTTP request; the token is the file's content (gRPC health and "
                        "reflection, HTTP /health, /ready and /metrics stay open)")
    parser.add_argument("--tls-cert", type=Path, metavar="PEM",
                        help="serve TLS (gRPC and HTTPS) with this certificate chain")
    parser.add_argument("--tls-key", type=Path, metavar="PEM", help="private key of --tls-cert")
    parser.add_argument("--drain-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="on SIGTERM, wait this long for running requests (default: %(default)s)")
    parser.add_argument("--max-message-bytes", type=byte_size, default=16 * 1024 * 1024, metavar="SIZE",
                        help="largest gRPC message accepted or sent, and largest HTTP request body "
                        "(default: 16MiB)")
    parser.add_argument("--workers", type=int, default=64,
                        help="threads handling gRPC calls; bounds concurrent gRPC calls (the HTTP "
                        "API runs on one event loop) (default: %(default)s)")
    parser.add_argument("--digest-cache", type=Path, metavar="DIR",
                        help="keep the digest records (a cache that spares rehashing adapter files "
                        "on open) in DIR instead of inside the registry; a registry this process "
                        "cannot write (a read-only mount) uses $XDG_CACHE_HOME/loradock/digests/ "
                        "by default, and the server says so at start")
    add_engine_arguments(parser)
    parser.set_defaults(func=cmd_serve)


def read_token_file(path: Path | None) -> str | None:
    """The token in `path` (surrounding whitespace removed), or None without a path."""
    if path is None:
        return None
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise UserError(f"cannot read token file {path}: {e.strerror}") from None
    if not token:
        raise UserError(f"token file {path} is empty")
    return token


def pick_base(registry, name: str | None) -> str:
    """`name` if given, else the registry's only base."""
    if name:
        return name
    bases = [b.name for b in registry.list_bases()]
    if len(bases) == 1:
        return bases[0]
    if not bases:
        raise UserError("the registry has no base model; run `loradock bases add` first")
    raise UserError(f"the registry has several bases ({', '.join(bases)}); choose one with --base")


def cmd_serve(args: argparse.Namespace) -> int:
    from loradock.runtime import lifecycle
    from loradock.runtime.engine import Engine  # torch loads only when serving
    from loradock.runtime.metrics import Metrics

    if (args.tls_cert is None) != (args.tls_key is None):
        raise UserError("give both --tls-cert and --tls-key, or neither")
    if not args.grpc and args.http_port is None:
        raise UserError("--no-grpc leaves nothing to serve: give --http-port too")
    if args.allow_adapter_updates and args.http_port is None:
        raise UserError("--allow-adapter-updates is for the HTTP API: give --http-port too")
    registry, note = serving_registry(args.home, args.digest_cache)
    if note:
        log.info("%s", note)
        if args.allow_adapter_updates and not registry.is_writable():
            raise UserError("--allow-adapter-updates publishes into the registry, which this "
                            "process cannot write")
    base = registry.base(pick_base(registry, args.base)).name  # a name or a stored base's directory
    knobs = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig) if f.name != "base"}
    try:
        config = EngineConfig(base=base, **knobs)
    except ValueError as e:
        raise UserError(str(e)) from None
    token = read_token_file(args.auth_token_file)
    engine = Engine(config, registry)
    metrics = Metrics(lambda: engine.stats() if engine.ready else {})
    try:
        edges = []
        if args.grpc:
            edges.append(_grpc_edge(args, engine, registry, metrics, token))
        if args.http_port is not None:
            edges.append(_http_edge(args, engine, registry, metrics, token))
        return lifecycle.serve(engine, edges, drain_timeout=args.drain_timeout, metrics=metrics,
                               metrics_host=args.host, metrics_port=args.metrics_port)
    except (lifecycle.StartupError, OSError) as e:  # bad TLS files, port in use, no such device
        raise UserError(str(e)) from None


def _grpc_edge(args: argparse.Namespace, engine, registry, metrics, token: str | None):
    from loradock.runtime.server.app import TlsFiles, create_server

    tls = TlsFiles(args.tls_cert, args.tls_key) if args.tls_cert else None
    server, _ = create_server(engine, registry, host=args.host, port=args.port, auth_token=token, tls=tls,
                              max_workers=args.workers, max_message_bytes=args.max_message_bytes,
                              metrics=metrics)
    return server


def _http_edge(args: argparse.Namespace, engine, registry, metrics, token: str | None):
    from loradock.runtime.http.server import create_http_server

    server, _ = create_http_server(engine, registry, metrics=metrics, host=args.host, port=args.http_port,
                                   auth_token=token, allow_adapter_updates=args.allow_adapter_updates,
                                   tls_cert=args.tls_cert, tls_key=args.tls_key,
                                   max_body_bytes=args.max_message_bytes)
    return server
