"""The import rules of DESIGN.md and docs/architecture.md ("Layers"), checked by reading every
module's imports, relative ones resolved to the names they mean.

    registry      imports no torch, grpc, protobuf, Ray, HTTP library, trainer, runtime or loradock/
    shared facts  registry modules the trainer and the runtime both use, torch-free:
                  quantization (the recipe), devices, docstrings, fsutil (the file hash),
                  peft_format (the PEFT adapter format)
    trainer       never imports the runtime or loradock/; reaches the registry only through
                  trainer/publish.py (its one door), apart from the shared facts
    runtime       never imports the trainer or loradock/
    engine        (runtime/ outside its edges) never imports an edge, protobuf, Ray or HTTP libraries
    protobuf      only in runtime/server, proto/ and the gRPC client (loradock/client.py)
    HTTP libs     (fastapi, starlette, pydantic, uvicorn) only in runtime/http
    Ray           only in runtime/cluster
    edges         runtime/server and runtime/http never import each other or the cluster; the
                  cluster reuses the HTTP edge and nothing else imports it but the CLI
    loradock/     the CLI (cli, commands/, demo) is the composition root: nothing imports it
                  except the CLI itself (cli.py -> commands/ -> demo); the library modules
                  (client, server_process, bases, heldout, evaluation, canary_report, errors, tables)
                  never import the CLI, and only the CLI and the benchmarks import them
    benchmarks    import the registry, the engine and loradock/'s library modules, never the
                  CLI, the trainer or an edge
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"registry": "loradock.registry", "trainer": "loradock.trainer",
           "runtime": "loradock.runtime", "proto": "loradock.proto",
           "benchmarks": "loradock.benchmarks", "loradock": "loradock"}

TORCH_STACK = ("torch", "transformers", "peft", "bitsandbytes", "safetensors.torch", "triton")
GRPC = ("grpc", "google.protobuf", "loradock.proto")
HTTP_LIBS = ("fastapi", "starlette", "pydantic", "uvicorn")
RAY = ("ray",)
EDGES = ("loradock.runtime.server", "loradock.runtime.http", "loradock.runtime.cluster")
CLI = ("loradock.cli", "loradock.commands", "loradock.demo", "loradock.__main__")
LORADOCK_LIBRARY = ("loradock.client", "loradock.server_process", "loradock.bases",
                    "loradock.heldout", "loradock.evaluation", "loradock.canary_report", "loradock.errors",
                    "loradock.tables")
LORADOCK_TOP = CLI + LORADOCK_LIBRARY
SHARED_FACTS = ("loradock.registry.quantization", "loradock.registry.devices",
                "loradock.registry.docstrings", "loradock.registry.fsutil",
                "loradock.registry.peft_format")


def module_name(path: Path) -> str:
    """The import name of a source file: runtime/server/app.py -> loradock.runtime.server.app."""
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [FOLDERS[rel.parts[0]], *rel.parts[1:]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@functools.cache
def imports_of(path: Path, name: str | None = None) -> frozenset[str]:
    """Every module `path` imports, anywhere in the file; relative imports are resolved against
    `name` (default: the file's own import name), and `from pkg import x` also counts as pkg.x."""
    tree = ast.parse(path.read_text(), filename=str(path))
    name = name or (module_name(path) if path.is_relative_to(ROOT) else path.stem)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if node.module:
                names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names if alias.name != "*")
    return frozenset(names)


def python_files(folder: str) -> list[Path]:
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files, f"{folder}/ has no modules"
    return files


def violations(files: list[Path], forbidden: tuple[str, ...], allowed: tuple[str, ...] = (),
               names: dict[Path, str] | None = None) -> list[str]:
    """`FILE imports NAME` for each import under a forbidden prefix and no allowed one."""

    def under(name: str, prefixes: tuple[str, ...]) -> bool:
        return any(name == p or name.startswith(p + ".") for p in prefixes)

    found = []
    for f in files:
        label = f.relative_to(ROOT) if f.is_relative_to(ROOT) else f.name
        bad: list[str] = []
        for name in sorted(imports_of(f, (names or {}).get(f))):
            # `from a.b import c` is reported once, as a.b, not again as a.b.c
            if under(name, forbidden) and not under(name, allowed) and not under(name, tuple(bad)):
                bad.append(name)
        found += [f"{label} imports {name}" for name in bad]
    return found


def in_folder(files: list[Path], *folders: str) -> list[Path]:
    return [f for f in files if any(f.is_relative_to(ROOT / d) for d in folders)]


def outside(files: list[Path], *folders: str) -> list[Path]:
    return [f for f in files if not any(f.is_relative_to(ROOT / d) for d in folders)]


# ---- the rules: each takes files (and their import names, for the failing cases) ----------


def registry_rule(files, names=None):
    forbidden = (*TORCH_STACK, *GRPC, *HTTP_LIBS, *RAY, "loradock.trainer", "loradock.runtime",
                 *LORADOCK_TOP)
    return violations(files, forbidden, names=names)


def trainer_rule(files, names=None):
    forbidden = ("loradock.runtime", "grpc", "google.protobuf", "loradock.proto", *HTTP_LIBS, *RAY,
                 *LORADOCK_TOP)
    return violations(files, forbidden, names=names)


def trainer_door_rule(files, names=None):
    """Only trainer/publish.py reads or writes the registry; the shared facts are free."""
    others = [f for f in files if f.name != "publish.py"]
    return violations(others, ("loradock.registry",), allowed=SHARED_FACTS, names=names)


def runtime_rule(files, names=None):
    return violations(files, ("loradock.trainer", *LORADOCK_TOP), names=names)


def engine_rule(files, names=None):
    return violations(files, (*EDGES, *GRPC, *HTTP_LIBS, *RAY), names=names)


def protobuf_rule(files, names=None):
    return violations(files, GRPC, names=names)


def http_libs_rule(files, names=None):
    return violations(files, HTTP_LIBS, names=names)


def ray_rule(files, names=None):
    return violations(files, RAY, names=names)


def http_edge_rule(files, names=None):
    return violations(files, ("loradock.runtime.server", "loradock.runtime.cluster", *GRPC), names=names)


def grpc_edge_rule(files, names=None):
    return violations(files, ("loradock.runtime.http", "loradock.runtime.cluster"), names=names)


def cluster_edge_rule(files, names=None):
    return violations(files, ("loradock.runtime.server", *GRPC), names=names)


def http_edge_users_rule(files, names=None):
    return violations(files, ("loradock.runtime.http",), names=names)


def cli_rule(files, names=None):
    return violations(files, CLI, names=names)


def loradock_library_rule(files, names=None):
    return violations(files, LORADOCK_LIBRARY, names=names)


def benchmarks_rule(files, names=None):
    return violations(files, (*CLI, "loradock.trainer", *EDGES), names=names)


def engine_files():
    return outside(python_files("runtime"), "runtime/server", "runtime/http", "runtime/cluster")


def cli_files():
    return [ROOT / "loradock/cli.py", *python_files("loradock/commands")]


ALL = ("registry", "trainer", "runtime", "proto", "benchmarks", "loradock")

# rule -> (the files it holds, a bad module and its import name, for the failing case)
RULES = {
    "registry": (registry_rule, lambda: python_files("registry"),
                 "from ..runtime.engine import Engine\n", "loradock.registry.bad"),
    "trainer": (trainer_rule, lambda: python_files("trainer"),
                "from loradock.runtime import Engine\n", "loradock.trainer.bad"),
    "trainer-door": (trainer_door_rule, lambda: python_files("trainer"),
                     "from loradock.registry.bases import BaseStore\n", "loradock.trainer.bad"),
    "runtime": (runtime_rule, lambda: python_files("runtime"),
                "from loradock import client\n", "loradock.runtime.bad"),
    "engine": (engine_rule, engine_files,
               "from .server import convert\n", "loradock.runtime.bad"),
    "protobuf": (protobuf_rule, lambda: outside(
                     [f for d in ALL for f in python_files(d)],
                     "runtime/server", "proto", "loradock/client.py"),
                 "from google.protobuf import json_format\n", "loradock.trainer.bad"),
    "http-libs": (http_libs_rule, lambda: outside([f for d in ALL for f in python_files(d)],
                                                   "runtime/http"),
                  "import pydantic\n", "loradock.runtime.server.bad"),
    "ray": (ray_rule, lambda: outside([f for d in ALL for f in python_files(d)], "runtime/cluster"),
            "from ray import serve\n", "loradock.runtime.bad"),
    "http-edge": (http_edge_rule, lambda: python_files("runtime/http"),
                  "from ..server import status\n", "loradock.runtime.http.bad"),
    "grpc-edge": (grpc_edge_rule, lambda: python_files("runtime/server"),
                  "from ..http.errors import http_status\n", "loradock.runtime.server.bad"),
    "cluster-edge": (cluster_edge_rule, lambda: python_files("runtime/cluster"),
                     "from loradock.runtime.server.convert import request_from_proto\n",
                     "loradock.runtime.cluster.bad"),
    "http-edge-users": (http_edge_users_rule, lambda: outside(
                            [f for d in ALL for f in python_files(d)],
                            "runtime/http", "runtime/cluster", "loradock/cli.py", "loradock/commands"),
                        "from loradock.runtime.http.routes import create_app\n",
                        "loradock.benchmarks.bad"),
    "nothing-imports-the-cli": (cli_rule, lambda: [f for f in (
                                    [f for d in ALL for f in python_files(d)]) if f not in cli_files()],
                                "from loradock.commands.common import print_table\n", "loradock.demo"),
    "library-not-for-the-layers": (loradock_library_rule, lambda: [
                                       f for d in ("registry", "trainer", "runtime", "proto")
                                       for f in python_files(d)],
                                   "from loradock.server_process import ServerProcess\n",
                                   "loradock.runtime.bad"),
    "benchmarks": (benchmarks_rule, lambda: python_files("benchmarks"),
                   "from loradock.trainer import train\n", "loradock.benchmarks.bad"),
}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_the_tree_keeps_the_rule(rule):
    check, files, _, _ = RULES[rule]
    assert check(files()) == []


@pytest.mark.parametrize("rule", sorted(RULES))
def test_the_rule_fails_on_a_bad_import(rule, tmp_path):
    check, _, source, name = RULES[rule]
    bad = tmp_path / "bad.py"
    bad.write_text(source)
    assert len(check([bad], {bad: name})) == 1, source


def store_reaches(files: list[Path]) -> list[str]:
    """`FILE:LINE reaches registry.STORE` for `<something registry>.adapters|bases.<attr>`: outside
    registry/ a Registry is used through its methods, not its stores."""
    found = []
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(), filename=str(f))):
            if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                    and node.value.attr in ("adapters", "bases")):
                continue
            owner = node.value.value
            if isinstance(owner, ast.Call):  # Registry(root).bases...
                owner = owner.func
            owner_name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
            if "registry" in owner_name.lower() or owner_name == "bench" or owner_name == "user":
                label = f.relative_to(ROOT) if f.is_relative_to(ROOT) else f.name
                found.append(f"{label}:{node.lineno} reaches registry.{node.value.attr}")
    return found


def test_registry_is_used_through_its_facade():
    files = [f for d in ("trainer", "runtime", "loradock", "benchmarks") for f in python_files(d)]
    assert store_reaches(files) == []


def test_the_facade_rule_fails_on_a_store_reach(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("info = self._registry.bases.get(name)\nRegistry(root).adapters.staging()\n"
                   "engine.adapters.read(key)\n")
    assert store_reaches([bad]) == ["bad.py:1 reaches registry.bases", "bad.py:2 reaches registry.adapters"]


def test_relative_imports_resolve_to_what_they_mean(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from . import engine\nfrom ..registry.bases import ResolvedBase\nfrom .server import app\n")
    assert imports_of(bad, "loradock.runtime.bad") == {
        "loradock.runtime.engine", "loradock.registry.bases", "loradock.registry.bases.ResolvedBase",
        "loradock.runtime.server", "loradock.runtime.server.app",
    }


def test_checker_catches_a_bad_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nfrom loradock.runtime.engine import Engine\n")
    assert registry_rule([bad]) == ["bad.py imports loradock.runtime.engine", "bad.py imports torch"]
