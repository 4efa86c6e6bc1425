"""The `loradock` command: one entry point, one module per subcommand group.

Each module in `loradock.commands` exposes `register(subparsers)`, which adds its
parser(s) and sets `func(args) -> int` as the handler.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys

from loradock.errors import UserError
from loradock.registry import RegistryError

# Subcommand modules, in the order `--help` lists them.
COMMAND_MODULES = ("bases", "adapters", "train", "export", "serve", "ui", "generate", "demo", "bench", "cluster")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loradock",
        description=(
            "Train LoRA adapters, keep them as verified versions in a registry, and serve "
            "many of them from one quantized base model. The registry lives in "
            "$LORADOCK_HOME (default ~/.loradock)."
        ),
    )
    parser.add_argument(
        "--home",
        metavar="PATH",
        help="registry root for this command (overrides $LORADOCK_HOME)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMAND_MODULES:
        importlib.import_module(f"loradock.commands.{module}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s" if args.verbose else "%(message)s",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "httpx2", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # On AVX512-BF16 CPUs bitsandbytes tries to fetch an optional kernel from the Hub at import and
    # warns when it cannot; its own kernel runs instead, so the warning says nothing to act on.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: "kernels-community" not in record.getMessage())
    try:
        return int(args.func(args) or 0)
    except (RegistryError, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        # A registry on a read-only mount, or files this user may not write: say which, no traceback.
        where = f" {e.filename}" if e.filename else ""
        print(f"error: cannot write{where}: {e.strerror} (is the registry read-only for this user?)",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
