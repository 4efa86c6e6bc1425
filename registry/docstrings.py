"""Field docstrings of a dataclass (the string literal under each field), for `--help` text.

Config dataclasses of the trainer and the runtime document each field this way; one
reader serves both.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import textwrap


def field_docs(cls: type) -> dict[str, str]:
    """{field name: docstring, whitespace folded} for every field of dataclass `cls` ("" if none)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in itertools.pairwise(body):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return {f.name: docs.get(f.name, "") for f in dataclasses.fields(cls)}
