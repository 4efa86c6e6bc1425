"""Helpers shared by the subcommand modules."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from loradock.registry import Registry


def registry_from(args: argparse.Namespace) -> Registry:
    """The registry selected by `--home` or `$LORADOCK_HOME`."""
    return Registry(args.home)


def print_json(obj: object) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print rows as a left-aligned text table."""
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
