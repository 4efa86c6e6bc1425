"""`loradock demo`: train, serve and hot-swap two invented domains from one base model."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from loradock.errors import UserError

DEFAULT_HOME = Path("demo-home")
# Written into a home the demo created, so a later fresh run may replace it safely.
MARKER = ".loradock-demo"


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "demo",
        help="train, serve and hot-swap two invented domains on one base model",
        description=(
            "One command that shows what loradock is for. It adds the base model "
            "(SmolLM2-135M-Instruct) if missing, trains a QLoRA adapter for each of two invented "
            "domains from examples/ (the planet Veloria, the company Quillfeather Robotics) and "
            "publishes them with alias 'prod', starts `loradock serve` on a free port, sends "
            "interleaved concurrent requests to both adapters and to the base model, prints the "
            "answers side by side and the held-out accuracy, publishes a second Quillfeather "
            "version and moves 'prod' to it while the server keeps running, and stops the server "
            "with SIGTERM. About 10-15 minutes on 2 CPU cores. By default it starts from a fresh "
            f"registry in ./{DEFAULT_HOME} (replacing one a previous demo made); --reuse or "
            "--home keep what is there and reuse the base and any adapter version trained with "
            "the same config and dataset digest."
        ),
        epilog="Exit status: 0 when the new version was served without restarting the server, "
        "1 when it was not, 2 for bad input (e.g. an unknown --base).",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--home", dest="demo_home", metavar="PATH",
        help="registry root to use and keep (reuses what matches; also `loradock --home PATH demo`)",
    )
    where.add_argument(
        "--reuse", action="store_true",
        help=f"keep ./{DEFAULT_HOME} from a previous run and reuse what matches",
    )
    parser.add_argument("--json", dest="json_path", metavar="PATH",
                        help="write the outcome (accuracy per domain, alias move, timings) as JSON")
    parser.add_argument(
        "--quick", action="store_true",
        help="smoke-test setting: 1 training step per adapter, 3 questions per domain, "
        "unquantized serving (checks the plumbing, not the accuracy)",
    )
    parser.add_argument(
        "--base", metavar="NAME",
        help="serve and train on this base, already in the registry (default: add and use "
        "smollm2-135m-instruct)",
    )
    parser.set_defaults(func=cmd_demo)


def fresh_home(path: Path) -> Path:
    """Empty `path` for a new demo run: refuses to touch a folder the demo did not create."""
    if path.exists() and any(path.iterdir()):
        if not (path / MARKER).is_file():
            raise UserError(
                f"{path} exists and was not created by `loradock demo`; remove it, "
                "or pass --home PATH to run the demo in (and reuse) that registry"
            )
        print(f"replacing the previous demo registry {path} (pass --reuse to keep it)")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text("created by `loradock demo`; a fresh demo run replaces this folder\n")
    return path


def choose_home(args: argparse.Namespace) -> Path:
    """--home (or the global --home) and --reuse keep a registry; the default starts fresh."""
    explicit = args.demo_home or args.home
    if explicit:
        path = Path(explicit).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        return path
    if args.reuse:
        DEFAULT_HOME.mkdir(exist_ok=True)
        (DEFAULT_HOME / MARKER).touch()
        return DEFAULT_HOME
    return fresh_home(DEFAULT_HOME)


def cmd_demo(args: argparse.Namespace) -> int:
    from loradock.demo import run_demo  # torch and grpc only when the demo runs

    home = choose_home(args)
    outcome = run_demo(home, base=args.base, quick=args.quick,
                       json_path=Path(args.json_path) if args.json_path else None)
    move = outcome.alias_move
    return 0 if move is not None and move.served_without_restart else 1
