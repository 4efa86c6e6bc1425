"""`loradock ui`: the web console over the registry alone, with no base model loaded."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from loradock.errors import UserError

from .common import registry_from
from .serve import read_token_file

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "ui",
        help="browse the registry in a web console (no base model loaded)",
        description="Serve the web console over the registry alone at http://HOST:PORT/ui: every "
        "adapter with its versions, aliases (and canary weights), digests, sizes, ranks and targets, "
        "base, 4-bit recipe, signer and trust, evaluations; a page per version with its manifest, "
        "model card, training curve and lineage. Serving figures and the playground need a server: "
        "`loradock serve --http-port N` has the same console at /ui. Alias moves and rollbacks from "
        "the page need --allow-adapter-updates and --auth-token-file (the page asks for the token).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8080, help="port; 0 picks a free one (default: %(default)s)")
    parser.add_argument("--auth-token-file", type=Path, metavar="FILE",
                        help="ask for this file's content (a token) before showing anything")
    parser.add_argument("--allow-adapter-updates", action="store_true",
                        help="let a logged-in user move aliases and roll them back from the pages "
                        "(needs --auth-token-file)")
    parser.add_argument("--trust", type=Path, metavar="POLICY",
                        help="show each version's verdict under this trust policy (YAML), as "
                        "`loradock serve --trust` would judge it")
    parser.set_defaults(func=cmd_ui)


def cmd_ui(args: argparse.Namespace) -> int:
    from loradock.registry.trust import TrustPolicy
    from loradock.runtime.http.server import serve_console

    if args.allow_adapter_updates and args.auth_token_file is None:
        raise UserError("--allow-adapter-updates needs --auth-token-file: writes from a page need a logged-in user")
    registry = registry_from(args)
    if args.allow_adapter_updates and not registry.is_writable():
        raise UserError(f"--allow-adapter-updates moves aliases in {registry.root}, which this process cannot write")
    try:
        serve_console(registry, host=args.host, port=args.port, auth_token=read_token_file(args.auth_token_file),
                      allow_updates=args.allow_adapter_updates,
                      policy=TrustPolicy.load(args.trust) if args.trust else None,
                      on_listening=lambda url: log.info("console on %s/ui (registry %s)", url, registry.root))
    except OSError as e:
        raise UserError(str(e)) from None
    return 0
