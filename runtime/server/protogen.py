"""Generate the committed Python stubs from `proto/loradock/v1/runtime.proto`.

    python -m loradock.runtime.server.protogen        # what `make proto` runs

protoc writes `from loradock.v1 import runtime_pb2`, which would import a top-level
package named `loradock.v1`; the stubs live in `loradock.proto.loradock.v1`, so the
import is rewritten to that namespaced package.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from importlib import resources
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parents[2] / "proto"
PROTO_FILES = ("loradock/v1/runtime.proto",)
STUB_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
STUB_PACKAGE = "loradock.proto"

_IMPORT = re.compile(r"^from loradock\.v1 import (\w+_pb2)", re.MULTILINE)
# Tool-version stamps: a newer grpcio-tools changes them without changing the API.
_VERSION_STAMPS = (
    re.compile(r"^# Protobuf Python Version: .*$", re.MULTILINE),
    re.compile(r"^_runtime_version\.ValidateProtobufRuntimeVersion\([^)]*\)$", re.MULTILINE),
    re.compile(r"^GRPC_GENERATED_VERSION = .*$", re.MULTILINE),
)


def stub_paths(root: Path = PROTO_ROOT) -> list[Path]:
    """The stub files generated for PROTO_FILES, under `root`."""
    return [root / (f.removesuffix(".proto") + s) for f in PROTO_FILES for s in STUB_SUFFIXES]


def generate(out_root: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Run protoc on PROTO_FILES, writing stubs under `out_root` (mirroring `proto/`)."""
    from grpc_tools import protoc  # a build-time tool (test extra), not a runtime dependency

    include = resources.files("grpc_tools") / "_proto"
    out_root.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *PROTO_FILES,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {', '.join(PROTO_FILES)} (see its message above)")
    written = stub_paths(out_root)
    for path in written:
        text = _IMPORT.sub(rf"from {STUB_PACKAGE}.loradock.v1 import \1", path.read_text())
        path.write_text(text)
    return written


def _without_stamps(text: str) -> str:
    for stamp in _VERSION_STAMPS:
        text = stamp.sub("", text)
    return text


def stale_stubs(proto_root: Path = PROTO_ROOT) -> list[str]:
    """Names of committed stubs that differ from freshly generated ones (empty when current)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp), proto_root)
        committed = stub_paths(proto_root)
        return [
            str(old.relative_to(proto_root))
            for new, old in zip(fresh, committed, strict=True)
            if not old.exists() or _without_stamps(old.read_text()) != _without_stamps(new.read_text())
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loradock.runtime.server.protogen",
        description="Regenerate the committed gRPC stubs under proto/ from the .proto files.",
    )
    parser.add_argument(
        "--check", action="store_true", help="only report stale stubs (exit 1 when any is stale)"
    )
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_stubs()
        for name in stale:
            print(f"stale: {name} (run `make proto`)")
        return 1 if stale else 0
    for path in generate(PROTO_ROOT):
        print(f"wrote {path.relative_to(PROTO_ROOT.parent)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
