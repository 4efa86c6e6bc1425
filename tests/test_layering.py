"""The import arrows of DESIGN.md, checked by reading every module's imports.

    registry  <- trainer, runtime, loradock (CLI)
    registry  imports no torch, grpc, trainer, runtime
    trainer   never imports the runtime
    runtime   never imports the trainer
    protobuf  only in runtime/server (and proto/)
    HTTP      schemas and server (fastapi, starlette, pydantic, uvicorn) only in runtime/http
    edges     runtime/server and runtime/http never import each other
    nothing   imports the CLI package `loradock` itself, except the CLI
    nothing   but the CLI imports runtime/http
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# folder -> import prefixes it must not use
FORBIDDEN = {
    "registry": ("torch", "transformers", "peft", "grpc", "google.protobuf", "bitsandbytes",
                 "loradock.trainer", "loradock.runtime", "loradock.proto", "loradock.cli",
                 "loradock.commands", "loradock.client", "loradock.bases"),
    "trainer": ("loradock.runtime", "loradock.proto", "grpc", "loradock.cli", "loradock.commands",
                "loradock.client"),
    "runtime": ("loradock.trainer", "loradock.cli", "loradock.commands", "loradock.client"),
}
# The engine (runtime outside runtime/server) speaks plain dataclasses.
ENGINE_FORBIDDEN = ("grpc", "google.protobuf", "loradock.proto")
HTTP_LIBS = ("fastapi", "starlette", "pydantic", "uvicorn")


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def python_files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def violations(files: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{f.relative_to(ROOT) if f.is_relative_to(ROOT) else f.name} imports {name}"
        for f in files
        for name in sorted(imports_of(f))
        if any(name == p or name.startswith(p + ".") for p in forbidden)
    ]


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_layer_imports(folder):
    files = python_files(folder)
    assert files, f"{folder}/ has no modules"
    assert violations(files, FORBIDDEN[folder]) == []


def test_engine_has_no_protobuf():
    engine = [f for f in python_files("runtime") if "server" not in f.relative_to(ROOT).parts]
    assert violations(engine, ENGINE_FORBIDDEN) == []


def test_http_schemas_live_only_in_the_http_edge():
    """fastapi/pydantic types never leak into the engine, the gRPC edge, the CLI or anything else."""
    outside = [f for d in ("registry", "trainer", "runtime", "loradock", "benchmarks", "proto")
               for f in python_files(d) if "http" not in f.relative_to(ROOT).parts]
    assert violations(outside, HTTP_LIBS) == []


def test_the_edges_do_not_import_each_other():
    http = python_files("runtime/http")
    assert http, "runtime/http/ has no modules"
    assert violations(http, ("grpc", "google.protobuf", "loradock.proto", "loradock.runtime.server")) == []
    assert violations(python_files("runtime/server"), ("loradock.runtime.http",)) == []


def test_only_the_cli_imports_the_http_edge():
    users = [f for d in ("registry", "trainer", "runtime", "benchmarks", "proto", "loradock") for f in python_files(d)
             if "http" not in f.relative_to(ROOT).parts and "commands" not in f.relative_to(ROOT).parts]
    assert violations(users, ("loradock.runtime.http",)) == []


def test_nothing_imports_the_cli():
    files = [f for d in ("registry", "trainer", "runtime", "benchmarks") for f in python_files(d)]
    assert violations(files, ("loradock.cli", "loradock.commands")) == []
    rest = [f for f in python_files("loradock") if f.name != "cli.py"]
    assert violations(rest, ("loradock.cli",)) == []


def test_checker_catches_a_bad_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nfrom loradock.runtime.engine import Engine\n")
    assert violations([bad], FORBIDDEN["registry"]) == [
        "bad.py imports loradock.runtime.engine",
        "bad.py imports torch",
    ]
