"""Property-based fuzzing (hypothesis, bounded examples).

- Request fields through the real gRPC server: any combination gets OK or a client-error
  code (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION), never INTERNAL, and the server
  keeps answering.
- adapter_config.json and manifest.json contents: what the registry accepts, the engine loads
  and generates with; every refusal is a validator's (its message, no KeyError, TypeError,
  AttributeError or IndexError behind it), never an internal crash turned into a refusal.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from loradock.proto.loradock.v1 import runtime_pb2 as pb
from loradock.registry import Registry, RegistryError
from loradock.runtime import EngineError

from loradock.client import Client
from tests.conftest import TINY_BASE
from tests.reliability.conftest import CONFIG, SOAK, plant_version
from tests.reliability.grpc_raw import call_message

CLIENT_ERRORS = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                 grpc.StatusCode.FAILED_PRECONDITION}
FUZZ = settings(max_examples=40 * SOAK, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

REFS = ["", "good@prod", "good@1", "good", "acme/other", "nosuch", "toobig", "truncated", "otherbase",
        "pickled", "good@99", "good@nosuch"]
# Mostly valid values, so requests get past validation into the engine, plus the odd bad one.
any_float = st.floats(allow_nan=True, allow_infinity=True)
uint32 = st.integers(0, 2**32 - 1)
sampling = st.builds(
    pb.SamplingParams,
    max_new_tokens=st.one_of(st.integers(1, 4), st.integers(1, 4), st.just(0), st.none()),
    temperature=st.one_of(st.just(0.0), st.floats(0.05, 3.0), st.sampled_from([5e-324, 1e-45, 1e300]), any_float),
    top_p=st.one_of(st.none(), st.floats(0.01, 1.0), st.sampled_from([1e-300, 1.0]), any_float),
    top_k=st.one_of(st.just(0), st.integers(1, 50), uint32),
    seed=st.one_of(st.none(), st.integers(0, 2**63 - 1), st.integers(0, 2**64 - 1)),
    stop=st.one_of(st.just([]), st.lists(st.text(min_size=1, max_size=4), max_size=2),
                   st.lists(st.text(max_size=4), max_size=2)),
    ignore_eos=st.booleans(),
)
messages = st.lists(st.builds(pb.ChatMessage, role=st.sampled_from(["user", "user", "system", "assistant", "tool"]),
                              content=st.text(max_size=40)), max_size=3)


@st.composite
def generate_requests(draw) -> pb.GenerateRequest:
    msg = pb.GenerateRequest(adapter=draw(st.one_of(st.sampled_from(REFS), st.sampled_from(REFS), st.text(max_size=30))),
                             sampling=draw(sampling), request_id=draw(st.text(max_size=12)))
    kind = draw(st.sampled_from(["prompt", "messages", "ids", "none"]))
    if kind == "prompt":
        msg.prompt = draw(st.text(max_size=120))  # "" included: invalid
    elif kind == "messages":
        msg.messages.messages.extend(draw(messages))
    elif kind == "ids":
        msg.prompt_token_ids.ids.extend(draw(st.lists(st.one_of(st.integers(0, 49151), st.integers(0, 49151),
                                                                uint32), max_size=12)))
    # an unset max_new_tokens means 64 new tokens; keep that rare so examples stay quick
    if not msg.sampling.HasField("max_new_tokens") and draw(st.booleans()):
        msg.sampling.max_new_tokens = 2
    return msg


@settings(FUZZ, max_examples=100 * SOAK)
@given(request=generate_requests(), stream=st.booleans())
def test_request_fields_never_cause_internal_errors(rel_server, request, stream):
    code, details = call_message(rel_server.address, request, stream=stream)
    event(code.name)
    assert code in CLIENT_ERRORS, (code, details, request)
    assert code == grpc.StatusCode.OK or details


def test_server_still_healthy_after_request_fuzzing(rel_server):
    with Client(rel_server.address, timeout=60) as c:
        assert c.health() == "SERVING"
        assert c.generate("Still here", adapter="good@prod", max_new_tokens=2).completion_tokens == 2


# ---- adapter_config.json and manifest.json ---------------------------------------------------

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=False, allow_infinity=False),
              st.text(max_size=12), st.sampled_from(["q_proj", "v_proj", "LORA", "/", "../..", "all-linear"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=6,
)
CONFIG_KEYS = ["r", "lora_alpha", "target_modules", "peft_type", "rank_pattern", "alpha_pattern", "use_rslora",
               "base_model_name_or_path", "bias", "use_dora", "lora_bias", "modules_to_save", "fan_in_fan_out",
               "layer_replication", "task_type"]
MANIFEST_KEYS = ["files", "base", "rank", "alpha", "target_modules", "peft_type", "source", "parent",
                 "created_at"]


def mutations(keys: list[str]):
    """Lists of (key, value) edits of a JSON object; value None here means 'delete the key'."""
    edit = st.tuples(st.sampled_from(keys), st.one_of(st.just(None), json_values.map(lambda v: ("set", v))))
    return st.lists(edit, min_size=1, max_size=3)


def apply(doc: dict, edits) -> dict:
    doc = dict(doc)
    for key, change in edits:
        if change is None:
            doc.pop(key, None)
        else:
            doc[key] = change[1]
    return doc


@pytest.fixture(scope="module")
def fuzz_registry(session_home: Path, tiny_base, templates, tmp_path_factory) -> Registry:
    """A registry holding `seed@1`, the good version fuzzed copies start from."""
    root = tmp_path_factory.mktemp("fuzz-home") / "home"
    root.mkdir()
    (root / "bases").symlink_to(session_home / "bases")
    registry = Registry(root)
    registry.publish(templates["qv"], "seed", base=TINY_BASE)
    return registry


@pytest.fixture(scope="module")
def fuzz_engine(fuzz_registry: Registry):
    from loradock.runtime import Engine, EngineConfig

    engine = Engine(EngineConfig(base=TINY_BASE, quantize="none", device="cpu", max_slots=2, max_rank=16,
                                 max_model_len=256, max_prompt_tokens=128, kv_cache_tokens=1024,
                                 registry_poll_s=0.0), fuzz_registry).start(run_loop=False)
    yield engine
    engine.shutdown(drain=False, timeout=5)


_names = (f"fz{i}" for i in itertools.count())
# An internal crash that a broad `except` turned into a refusal shows up in the error's chain.
CRASHES = (KeyError, TypeError, AttributeError, IndexError)


def _assert_not_a_crash(error: BaseException) -> None:
    """No KeyError/TypeError/AttributeError/IndexError behind `error` (the registry's and the
    engine's own errors may subclass KeyError/ValueError; they are refusals, not crashes)."""
    seen: list[BaseException] = []
    e: BaseException | None = error
    while e is not None and e not in seen:
        seen.append(e)
        e = e.__cause__ or e.__context__
    crashes = [c for c in seen if isinstance(c, CRASHES) and not isinstance(c, RegistryError | EngineError)]
    assert not crashes, f"{error!r} hides an internal crash: {crashes!r}"


def _registry_answer(call):
    """`call()`'s result, or the RegistryError it refused with (checked to hide no crash)."""
    try:
        return call()
    except RegistryError as e:
        _assert_not_a_crash(e)
        return e


def _request(ref: str):
    from loradock.runtime import GenerationRequest, SamplingParams

    return GenerationRequest(adapter=ref, prompt="Hi", sampling=SamplingParams(max_new_tokens=1))


def _generates(engine, ref: str, version_ref: str) -> None:
    """`ref` loads and generates one token, served by `version_ref`."""
    assert engine.load_adapter(ref).ref == version_ref
    result = engine.generate(_request(ref))
    assert result.completion_tokens == 1 and result.adapter.ref == version_ref


def _refuses(engine, ref: str, message: str) -> None:
    """Loading and admission both refuse `ref` with an EngineError that carries `message`
    (the validator's words) and hides no crash."""
    for attempt in (lambda: engine.load_adapter(ref), lambda: engine.generate(_request(ref))):
        with pytest.raises(EngineError) as info:
            attempt()
        _assert_not_a_crash(info.value)
        assert message in str(info.value), (str(info.value), message)


def _engine_verdict(engine, registry: Registry, ref: str) -> Exception | None:
    """What the engine's adapter validator says about `ref` when called directly: None (it
    would serve it) or its AdapterUnavailableError; anything else raised here is a crash."""
    from loradock.runtime import AdapterUnavailableError
    from loradock.runtime.adapter_weights import read_adapter
    from loradock.runtime.types import ResolvedAdapter

    version = registry.resolve(ref)
    key = ResolvedAdapter(version.name, version.version, version.digest)
    try:
        read_adapter(key, version.path, version.manifest, engine.served, engine.dtype)
    except AdapterUnavailableError as e:
        _assert_not_a_crash(e)
        return e
    return None


def _serve_as_validated(engine, registry: Registry, ref: str) -> None:
    """The engine serves `ref` exactly when its validator accepts it, else refuses with the
    validator's message."""
    verdict = _engine_verdict(engine, registry, ref)
    event("engine serves" if verdict is None else "engine refuses")
    if verdict is None:
        _generates(engine, ref, registry.resolve(ref).ref)
    else:
        _refuses(engine, ref, str(verdict))


def _remove(registry: Registry, name: str) -> None:
    """Drop a planted name, so one example's bad files cannot fail the next example."""
    path = registry.root / "adapters" / name
    for p in path.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    shutil.rmtree(path, ignore_errors=True)


@FUZZ
@given(edits=st.one_of(mutations(CONFIG_KEYS), json_values.map(lambda v: [("<whole>", v)])))
# configs the engine's reader once crashed on (planted), or the registry stored and the engine refused
@example(edits=[("<whole>", None)])
@example(edits=[("lora_alpha", ("set", "16"))])
@example(edits=[("rank_pattern", ("set", ["q_proj"]))])
@example(edits=[("rank_pattern", ("set", {"(?i)q_proj": 8}))])
@example(edits=[("alpha_pattern", ("set", {"v_proj": "2"}))])
@example(edits=[("bias", ("set", "all"))])
@example(edits=[("fan_in_fan_out", ("set", True))])
def test_fuzzed_adapter_config(fuzz_registry, fuzz_engine, templates, tmp_path_factory, edits):
    """Guards against internal crashes passing as refusals: a config the registry accepts as
    servable must load and generate (as not servable: be refused for the manifest's reasons); one it refuses is refused with its validator's message, and the engine,
    given it behind the registry's back, serves it or refuses it with its own validator's words."""
    from loradock.registry.validate import validate_adapter_dir

    src = Path(tmp_path_factory.mktemp("cfg"))
    shutil.copy2(templates["qv"] / "adapter_model.safetensors", src)
    good = json.loads((templates["qv"] / CONFIG).read_text())
    doc = edits[0][1] if edits[0][0] == "<whole>" else apply(good, edits)
    (src / CONFIG).write_text(json.dumps(doc))
    name = next(_names)
    try:
        version = fuzz_registry.publish(src, name, base=TINY_BASE)
    except RegistryError as refused:
        event("registry refused")
        _assert_not_a_crash(refused)
        with pytest.raises(RegistryError) as direct:
            validate_adapter_dir(src)
        assert str(refused) == str(direct.value)
    else:
        assert fuzz_registry.resolve(version.ref).digest == version.digest
        if version.manifest["servable"]:
            event("registry accepted")
            _generates(fuzz_engine, name, version.ref)
        else:  # stored, and the engine refuses it for the reasons the manifest records
            event("registry accepted as not servable")
            for reason in version.manifest["not_servable_because"]:
                _refuses(fuzz_engine, name, reason)
        return
    # the runtime's own checks, on the same config planted where the registry cannot refuse it
    planted = next(_names)
    plant_version(fuzz_registry, planted, "seed@1", files={CONFIG: json.dumps(doc).encode()})
    try:
        _serve_as_validated(fuzz_engine, fuzz_registry, planted)
    finally:
        _remove(fuzz_registry, planted)


@FUZZ
@given(edits=st.one_of(mutations(MANIFEST_KEYS), json_values.map(lambda v: [("<whole>", v)])))
# another base (the engine's refusal), and a fingerprint that is no string (it once crashed the reader)
@example(edits=[("base", ("set", {"name": "llama-70b", "fingerprint": "f" * 64}))])
@example(edits=[("base", ("set", {"name": "llama-70b", "fingerprint": 5}))])
def test_fuzzed_manifest(fuzz_registry, fuzz_engine, edits):
    """Guards against a damaged manifest crashing the registry or the engine, or a crash in the
    engine passing as a refusal: the registry's reads refuse it with a RegistryError or agree on
    the version, and the engine serves exactly what the registry resolves."""
    name = next(_names)
    path = plant_version(fuzz_registry, name, "seed@1")
    manifest = json.loads((path / "manifest.json").read_text())
    doc = edits[0][1] if edits[0][0] == "<whole>" else apply(manifest, edits)
    (path / "manifest.json").write_text(json.dumps(doc))
    try:
        listed = {v.name: v for v in fuzz_registry.list()}  # a damaged version is left out, not fatal
        [checked] = fuzz_registry.verify(name)
        versions = _registry_answer(lambda: fuzz_registry.versions(name))
        version = _registry_answer(lambda: fuzz_registry.resolve(name))
        if isinstance(version, RegistryError):
            event("registry refused")
            assert not checked.ok, "resolve refuses a version that verify passes"
            _refuses(fuzz_engine, name, str(version))
            return
        event("registry accepted")
        assert checked.ok, checked.problems
        assert listed[name].digest == version.digest
        assert isinstance(versions, list) and [v.digest for v in versions] == [version.digest]
        _serve_as_validated(fuzz_engine, fuzz_registry, name)
    finally:
        _remove(fuzz_registry, name)
