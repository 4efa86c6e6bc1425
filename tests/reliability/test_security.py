"""Security: the token guards every Runtime RPC, TLS refuses plaintext, adapters never go
through pickle, remote code is never trusted, and a Hub pull cannot write outside the registry."""

from __future__ import annotations

import ast
import json
import pickle
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from loradock.proto.loradock.v1 import runtime_pb2 as pb
from loradock.registry import InvalidAdapterError, Registry, RegistryError

from tests.conftest import TINY_BASE
from tests.registry.conftest import hub_env, olah  # noqa: F401 (fixtures used below)
from tests.registry.hub_server import GIT, init_repo
from tests.reliability.conftest import TOKEN

REPO = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ("loradock", "registry", "runtime", "trainer", "benchmarks", "proto")
RUNTIME_SERVICE = pb.DESCRIPTOR.services_by_name["Runtime"]


def _rpc(channel: grpc.Channel, method) -> callable:
    """A callable for `method` of the Runtime service, built from the proto descriptor."""
    from google.protobuf import message_factory

    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    path = f"/{RUNTIME_SERVICE.full_name}/{method.name}"
    if method.server_streaming:
        rpc = channel.unary_stream(path, request_serializer=request_cls.SerializeToString,
                                   response_deserializer=response_cls.FromString)
        return lambda metadata: list(rpc(request_cls(), timeout=10, metadata=metadata))
    rpc = channel.unary_unary(path, request_serializer=request_cls.SerializeToString,
                              response_deserializer=response_cls.FromString)
    return lambda metadata: rpc(request_cls(), timeout=10, metadata=metadata)


def _secure_channel(server) -> grpc.Channel:
    return grpc.secure_channel(server.address, grpc.ssl_channel_credentials(server.tls_cert.read_bytes()))


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),),
                                      (("authorization", f"Basic {TOKEN}"),)],
                         ids=["missing", "wrong", "no-scheme", "basic"])
def test_every_runtime_rpc_needs_the_token(guarded_server, metadata, figures):
    """Every method the proto declares, so a new RPC cannot be forgotten."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    methods = list(RUNTIME_SERVICE.methods)
    assert len(methods) >= 6
    with _secure_channel(guarded_server) as channel:
        for method in methods:
            with pytest.raises(grpc.RpcError) as info:
                _rpc(channel, method)(metadata)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, (method.name, info.value)
            assert "token" in info.value.details() or "authorization" in info.value.details()
        # with the token the same channel works, and health needs none
        response = _rpc(channel, RUNTIME_SERVICE.methods_by_name["GetInfo"])((("authorization", f"Bearer {TOKEN}"),))
        assert response.base_name == TINY_BASE
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    figures(rpcs_checked=len(methods))


def test_plaintext_client_cannot_talk_to_a_tls_server(guarded_server):
    with grpc.insecure_channel(guarded_server.address) as channel:
        for method in RUNTIME_SERVICE.methods:
            with pytest.raises(grpc.RpcError) as info:
                _rpc(channel, method)((("authorization", f"Bearer {TOKEN}"),))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, (method.name, info.value)


# ---- pickle ---------------------------------------------------------------------------------


def test_publish_and_serve_never_unpickle(registry: Registry, tiny_base, templates, monkeypatch):
    """With every unpickling entry point booby-trapped, an adapter is published, loaded and
    served: none of them is touched."""
    import torch
    from loradock.runtime import Engine, EngineConfig, GenerationRequest, SamplingParams

    engine = Engine(EngineConfig(base=TINY_BASE, quantize="none", device="cpu", max_rank=16, max_model_len=256,
                                 max_prompt_tokens=128, kv_cache_tokens=1024), registry).start(run_loop=False)
    try:
        def trap(*args, **kwargs):
            raise AssertionError("an adapter went through pickle")

        for module, attr in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load"),
                             (torch.serialization, "load")):
            monkeypatch.setattr(module, attr, trap)
        version = registry.publish(templates["all"], "nopickle", base=TINY_BASE)
        assert engine.load_adapter("nopickle").digest == version.digest
        result = engine.generate(GenerationRequest(adapter="nopickle", prompt="Hello",
                                                   sampling=SamplingParams(max_new_tokens=3)))
        assert result.completion_tokens == 3 and result.adapter.ref == "nopickle@1"
    finally:
        engine.shutdown(drain=False, timeout=5)


def test_publish_refuses_pickle_weights_without_loading_them(registry: Registry, templates, tmp_path,
                                                             pickle_marker):
    from tests.reliability.conftest import pickle_bytes

    src = tmp_path / "pickled"
    src.mkdir()
    shutil.copy2(templates["qv"] / "adapter_config.json", src)
    (src / "adapter_model.bin").write_bytes(pickle_bytes(pickle_marker))
    with pytest.raises(RegistryError, match=r"pickle weights \(adapter_model\.bin\) are refused") as info:
        registry.publish(src, "pickled")
    assert "safe_serialization" in str(info.value) or "safetensors" in str(info.value)
    assert not pickle_marker.exists()
    assert registry.list() == []


def _source_files() -> list[Path]:
    return [p for d in SOURCE_DIRS for p in sorted((REPO / d).rglob("*.py")) if "_pb2" not in p.name]


UNPICKLERS = ("pickle", "cPickle", "_pickle", "dill", "joblib", "cloudpickle")


def _kw_is(call: ast.Call, arg: str, value: bool, missing: bool = False) -> bool:
    """Whether keyword `arg` of `call` is the literal `value` (or absent, when `missing`)."""
    for k in call.keywords:
        if k.arg == arg:
            return isinstance(k.value, ast.Constant) and k.value.value is value
    return missing


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_no_source_file_unpickles(figures):
    """Static check: no pickle/dill/joblib loading anywhere; torch.load only for the trainer's
    own optimizer checkpoints and only with weights_only=True; none at all where adapters are read."""
    files = _source_files()
    assert len(files) > 20
    findings = []
    for path in files:
        rel = path.relative_to(REPO).as_posix()
        for call, name in _calls(ast.parse(path.read_text(), rel)):
            where = f"{rel}:{call.lineno} {name}"
            module, _, func = name.rpartition(".")
            if func in ("load", "loads", "Unpickler") and module in UNPICKLERS:
                findings.append(where)
            if name == "torch.load" and not (rel.startswith("trainer/") and _kw_is(call, "weights_only", True)):
                findings.append(where)
            if func == "load" and module in ("np", "numpy") and not _kw_is(call, "allow_pickle", False, missing=True):
                findings.append(where)
    assert findings == []
    figures(files_scanned=len(files))


# ---- remote code ----------------------------------------------------------------------------


def test_no_source_file_enables_trust_remote_code():
    """Every `trust_remote_code` in the sources is the literal False (as a keyword or a dict key)."""
    findings = []
    for path in _source_files():
        rel = path.relative_to(REPO).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), rel)):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code" and not (
                    isinstance(node.value, ast.Constant) and node.value.value is False):
                findings.append(f"{rel}:{node.value.lineno}")
            if isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values, strict=True):
                    if isinstance(key, ast.Constant) and key.value == "trust_remote_code" and not (
                            isinstance(value, ast.Constant) and value.value is False):
                        findings.append(f"{rel}:{key.lineno}")
    assert findings == []


@pytest.fixture
def auto_map_base(tiny_base, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the tiny base whose config and tokenizer config point `auto_map` at custom code
    shipped next to the weights; that code creates `marker` if it is ever imported."""
    base = Path(shutil.copytree(tiny_base.path, tmp_path / "remote-code-base", symlinks=False))
    for f in base.iterdir():
        f.chmod(0o644)
    marker = tmp_path / "remote-code-ran"
    (base / "evil_model.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'llama'\n"
        "class EvilForCausalLM(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil_model.EvilConfig", "AutoModelForCausalLM": "evil_model.EvilForCausalLM"}
    (base / "config.json").write_text(json.dumps(config))
    tok_path = base / "tokenizer_config.json"
    tok = json.loads(tok_path.read_text())
    tok["auto_map"] = {"AutoTokenizer": ["evil_model.EvilTokenizer", None]}
    tok_path.write_text(json.dumps(tok))
    return base, marker


def test_a_base_with_auto_map_runs_no_remote_code(auto_map_base, registry: Registry):
    from loradock.registry.errors import InvalidBaseError
    from loradock.runtime import Engine, EngineConfig

    from loradock.bases import import_base

    base, marker = auto_map_base
    engine = Engine(EngineConfig(base=str(base), quantize="none", device="cpu", max_model_len=256,
                                 max_prompt_tokens=128, kv_cache_tokens=1024), registry)
    try:
        engine.start(run_loop=False)
    except (ValueError, OSError, InvalidBaseError) as e:  # refusing is fine too, as long as nothing ran
        assert "remote" in str(e) or "auto_map" in str(e), e
    else:
        model = engine.runner.model
        assert type(model).__name__ == "LlamaForCausalLM"
        assert type(model).__module__.startswith("transformers.models.llama")
        engine.shutdown(drain=False, timeout=5)
    try:
        import_base(registry, base, name="remote-code")
    except (InvalidBaseError, ValueError) as e:
        assert "remote" in str(e) or "auto_map" in str(e), e
    assert not marker.exists(), "custom code from the base directory was executed"


# ---- Hub pulls ------------------------------------------------------------------------------


def _git(repo: Path, *args: str, stdin: str | None = None) -> str:
    return subprocess.run([*GIT, *args], cwd=repo, input=stdin, check=True, capture_output=True,
                          text=True).stdout.strip()


def commit_tree(repo: Path, entries: dict[str, bytes | dict]) -> str:
    """Commit a tree built with git plumbing, so names `git add` would refuse ('..', drive
    letters, backslashes) end up in the repo. `entries` maps names to bytes or subtrees."""

    def tree(items: dict[str, bytes | dict]) -> str:
        lines = []
        for name, value in items.items():
            if isinstance(value, dict):
                lines.append(f"040000 tree {tree(value)}\t{name}")
            else:
                blob = subprocess.run([*GIT, "hash-object", "-w", "--stdin"], cwd=repo, input=value, check=True,
                                      capture_output=True).stdout.decode().strip()
                lines.append(f"100644 blob {blob}\t{name}")
        return _git(repo, "mktree", stdin="\n".join(lines) + "\n")

    sha = _git(repo, "commit-tree", tree(entries), "-m", "crafted")
    _git(repo, "update-ref", "refs/heads/main", sha)
    return sha


def _nested(depth: int, leaf: dict) -> dict:
    for _ in range(depth):
        leaf = {"..": leaf}
    return leaf


HOSTILE_NAMES = {
    "dotdot": lambda w: _nested(8, {"escaped.safetensors": w}),  # ../../../../../../../../escaped.safetensors
    "backslash": lambda w: {"..\\..\\..\\escaped.safetensors": w},
    "drive": lambda w: {"C:escaped.safetensors": w},
    "drive-root": lambda w: {"C:\\escaped.safetensors": w},
}


# olah answers 500 to a listing that holds a '..' name, so loradock's own check would never run;
# for those kinds the listing a Hub could send is read from the crafted repo itself.
OLAH_CANNOT_LIST = {"dotdot"}
REFUSAL = r"holds file names that could escape the download folder \(.*escaped\.safetensors.*\); refusing"


def _list_from_git(monkeypatch: pytest.MonkeyPatch, repo: Path) -> None:
    """Answer HfApi.model_info from `repo`'s git tree (names exactly as committed)."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import ModelInfo

    def model_info(self, repo_id: str, revision: str | None = None, **kwargs) -> ModelInfo:
        sha = _git(repo, "rev-parse", revision or "main")
        names = [n for n in _git(repo, "ls-tree", "-r", "-z", "--name-only", sha).split("\0") if n]
        return ModelInfo(id=repo_id, sha=sha, siblings=[{"rfilename": n} for n in names])

    monkeypatch.setattr(HfApi, "model_info", model_info)


@pytest.mark.parametrize("kind", list(HOSTILE_NAMES))
def test_hub_pull_cannot_write_outside_the_registry(registry: Registry, olah, hub_env,  # noqa: F811
                                                     templates, tmp_path, kind, monkeypatch):
    """Guards against loradock's unsafe-name check not running (or not refusing) for a repo whose
    listing holds '..', backslash or drive-letter names: the refusal must be loradock's own."""
    hub_env(olah.endpoint)
    repo = olah.mirrors / "models" / "acme" / f"hostile-{kind}"
    init_repo(repo)
    weights = (templates["qv"] / "adapter_model.safetensors").read_bytes()
    commit_tree(repo, {"adapter_config.json": (templates["qv"] / "adapter_config.json").read_bytes(),
                       "adapter_model.safetensors": weights, **HOSTILE_NAMES[kind](weights)})
    if kind in OLAH_CANNOT_LIST:
        _list_from_git(monkeypatch, repo)
    outside = tmp_path.parent

    def files_outside() -> set[Path]:
        return {p for p in outside.rglob("*escaped*")}

    before = files_outside()
    with pytest.raises(Exception) as info:  # the type is checked last, after the files
        registry.pull(f"acme/hostile-{kind}")
    assert files_outside() == before  # nothing landed outside the registry root
    assert registry.list() == []
    staging = registry.root / "adapters" / ".staging"
    assert not staging.exists() or not [p for p in staging.iterdir() if p.suffix != ".lock"]
    # loradock's refusal (the CLI prints it; exit 2), naming the file; not a Hub or mirror error
    assert isinstance(info.value, InvalidAdapterError), repr(info.value)
    assert info.match(REFUSAL)
