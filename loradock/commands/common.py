"""Helpers shared by the subcommand modules."""

from __future__ import annotations

import argparse
import json
import sys

from loradock.registry import Registry
from loradock.tables import print_table

__all__ = ["print_json", "print_table", "registry_from"]


def registry_from(args: argparse.Namespace) -> Registry:
    """The registry selected by `--home` or `$LORADOCK_HOME`."""
    return Registry(args.home)


def print_json(obj: object) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")
