"""The committed stubs must be what `make proto` generates from the committed .proto."""

from __future__ import annotations

import shutil
from pathlib import Path

from loradock.runtime.server import protogen


def test_committed_stubs_are_current():
    assert protogen.stale_stubs() == [], "stubs are stale: run `make proto` and commit the result"


def test_stubs_import_the_namespaced_package():
    grpc_stub = (protogen.PROTO_ROOT / "loradock/v1/runtime_pb2_grpc.py").read_text()
    assert "from loradock.proto.loradock.v1 import runtime_pb2" in grpc_stub
    assert "from loradock.v1 import" not in grpc_stub


def test_a_changed_proto_makes_the_stubs_stale(tmp_path: Path):
    root = Path(shutil.copytree(protogen.PROTO_ROOT, tmp_path / "proto"))
    proto = root / "loradock/v1/runtime.proto"
    proto.write_text(proto.read_text().replace("message GetInfoRequest {}",
                                               "message GetInfoRequest {\n  bool verbose = 1;\n}"))
    assert protogen.stale_stubs(root) == ["loradock/v1/runtime_pb2.py", "loradock/v1/runtime_pb2.pyi"]
