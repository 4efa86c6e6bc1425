"""Hub pull through a real olah mirror, and push to the in-test upload server, with the real client."""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path

import pytest
from loradock.registry import InvalidAdapterError, NotFoundError, Registry, RegistryError

from loradock.cli import main
from tests.registry.hub_server import HubUploadServer, commit_files, git, init_repo, lfs_pointer

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
WEIGHTS = "adapter_model.safetensors"


@pytest.fixture
def lfs_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the client upload large files over git-lfs, as it does without hf_xet: the test
    server does not speak Xet, which the client prefers when hf_xet is installed."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)  # read at import


def http(
    method: str, url: str, body: bytes | dict | Iterable[bytes] | None = None
) -> tuple[int, dict]:
    """One request to the test server; returns (status, JSON answer), errors included.
    An iterable body is sent chunked."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def error_chain(exc: BaseException | None) -> str:
    """The messages of an exception and all its causes."""
    messages = []
    while exc is not None:
        messages.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return " <- ".join(messages)


def hub_repo(olah, repo_id: str) -> Path:
    """An empty git repo that olah serves as model `repo_id`."""
    path = olah.mirrors / "models" / repo_id
    init_repo(path)
    return path


def adapter_files(adapter: Path) -> dict[str, bytes]:
    files = {rel: (adapter / rel).read_bytes() for rel in ADAPTER_FILES}
    files["README.md"] = b"---\nlibrary_name: peft\n---\n# upstream card\n"
    files["training_args.bin"] = b"not downloaded"
    return files


def no_files_outside_root(tmp_path: Path) -> bool:
    hf_home = tmp_path / "hf-home"
    return not hf_home.exists() or not [p for p in hf_home.rglob("*") if p.is_file() and "safetensors" in p.name]


def test_pull_pinned_sha_tag_and_noop(registry: Registry, olah, hub_env, lora_dir, lora_dir_2, tmp_path):
    hub_env(olah.endpoint)
    repo = hub_repo(olah, "acme/medical")
    first = commit_files(repo, adapter_files(lora_dir), "v1")
    git(repo, "tag", "v1")
    second = commit_files(repo, adapter_files(lora_dir_2), "v2")

    v1 = registry.pull("acme/medical", revision=first)
    assert (v1.name, v1.version) == ("acme/medical", 1)
    assert v1.manifest["source"] == {"kind": "hub", "repo": "acme/medical", "revision": first, "commit": first}
    for rel in ADAPTER_FILES:
        assert (v1.path / rel).read_bytes() == (lora_dir / rel).read_bytes()
    assert not (v1.path / "training_args.bin").exists()
    assert v1.manifest["base"]["name"] == "tiny-llama"
    card = (v1.path / "README.md").read_text()
    assert card.startswith("---\nbase_model: tiny-llama\n")
    assert "pulled from acme/medical at commit " + first in card
    assert "## Upstream model card\n\n# upstream card" in card

    generation = registry.generation()
    again = registry.pull("acme/medical", revision="v1")  # the tag names the same commit: no-op
    assert again == v1 and registry.generation() == generation

    latest = registry.pull("acme/medical")  # main -> the second commit
    assert latest.version == 2
    assert latest.manifest["source"] == {"kind": "hub", "repo": "acme/medical", "revision": "main", "commit": second}
    assert (latest.path / "adapter_model.safetensors").read_bytes() == (
        lora_dir_2 / "adapter_model.safetensors"
    ).read_bytes()
    assert registry.pull("acme/medical", revision="main") == latest
    assert [v.version for v in registry.versions("acme/medical")] == [1, 2]
    assert no_files_outside_root(tmp_path)
    assert not list((registry.root / "adapters" / ".staging").iterdir())


def test_racing_pulls_of_one_commit_make_one_version(registry: Registry, olah, hub_env, lora_dir, monkeypatch):
    """Both pulls checked for an existing version before either published (forced here): the
    check repeated under the name's lock makes the second one return the first one's version."""
    from loradock.registry import hub

    hub_env(olah.endpoint)
    commit_files(hub_repo(olah, "acme/race"), adapter_files(lora_dir), "weights")
    monkeypatch.setattr(hub, "_existing_pull", lambda *args: None)
    first = registry.pull("acme/race")
    assert registry.pull("acme/race") == first
    assert [v.version for v in registry.versions("acme/race")] == [1]


def test_pull_into_another_name_with_tag(registry: Registry, olah, hub_env, lora_dir):
    hub_env(olah.endpoint)
    repo = hub_repo(olah, "acme/tagged")
    sha = commit_files(repo, adapter_files(lora_dir), "release")
    git(repo, "tag", "release-1")
    commit_files(repo, {"notes.txt": b"later"}, "later")
    v = registry.pull("acme/tagged", revision="release-1", name="legal")
    assert v.ref == "legal@1"
    assert v.manifest["source"]["commit"] == sha and v.manifest["source"]["revision"] == "release-1"


def test_pull_refuses_pickle_only_repo(registry: Registry, olah, hub_env, lora_dir):
    hub_env(olah.endpoint)
    repo = hub_repo(olah, "acme/pickled")
    commit_files(repo, {"adapter_config.json": (lora_dir / "adapter_config.json").read_bytes(),
                        "adapter_model.bin": b"\x80\x04pickle"}, "bin only")
    with pytest.raises(InvalidAdapterError, match=r"only pickle weights \(adapter_model.bin\)") as info:
        registry.pull("acme/pickled")
    assert "safe_serialization=True" in str(info.value)
    assert registry.list() == []


def test_pull_unknown_repo_or_revision(registry: Registry, olah, hub_env, lora_dir):
    hub_env(olah.endpoint)
    with pytest.raises(NotFoundError, match=r"acme/nothing@main: not found on http://127\.0\.0\.1"):
        registry.pull("acme/nothing")
    repo = hub_repo(olah, "acme/exists")
    commit_files(repo, adapter_files(lora_dir), "c")
    with pytest.raises(NotFoundError, match="acme/exists@no-such-branch: not found"):
        registry.pull("acme/exists", revision="no-such-branch")
    assert registry.list() == []


def test_pull_when_hub_is_down(registry: Registry, hub_env):
    from tests.registry.conftest import free_port

    hub_env(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(RegistryError, match=r"cannot reach the Hub at http://127\.0\.0\.1"):
        registry.pull("acme/medical")


def test_push_then_pull_back(
    registry: Registry, olah, hub_env, lfs_client, lora_dir, lora_dir_2, monkeypatch
):
    with HubUploadServer(olah.mirrors, token="hf_secret") as server:
        hub_env(server.endpoint)
        monkeypatch.setenv("HF_TOKEN", "hf_secret")
        pushed = registry.publish(lora_dir, "medical")
        commit = registry.push("medical@1", "acme/pushed")
        repo = server.repo_dir("acme/pushed")
        assert git(repo, "rev-parse", "HEAD") == commit
        assert git(repo, "show", "-s", "--format=%s", commit).startswith("Upload medical@1")
        assert ("POST", "/api/repos/create") in server.requests
        assert ("POST", "/api/models/acme/pushed/commit/main") in server.requests

        # The weights took the Hub's LFS path (guards against a push, or this server, sending
        # .safetensors inline, which the real Hub never receives): batch, PUT, verify, then an
        # lfsFile commit entry; the small text files came inline.
        weights = (pushed.path / WEIGHTS).read_bytes()
        oid = hashlib.sha256(weights).hexdigest()
        inline = sorted(p.name for p in pushed.path.iterdir() if p.is_file() and p.name != WEIGHTS)
        assert {"README.md", "adapter_config.json", "manifest.json"} <= set(inline)
        assert server.commits == [
            {"repo": "acme/pushed", "sha": commit, "lfs": [WEIGHTS], "regular": inline}
        ]
        lfs_calls = [
            ("POST", "/acme/pushed.git/info/lfs/objects/batch"),
            ("PUT", f"/acme/pushed.git/info/lfs/objects/{oid}"),
            ("POST", "/acme/pushed.git/info/lfs/objects/verify"),
            ("POST", "/api/models/acme/pushed/commit/main"),
        ]
        assert [r for r in server.requests if r in lfs_calls] == lfs_calls
        assert (repo / WEIGHTS).read_bytes() == lfs_pointer(oid, len(weights))
        assert server.lfs_object("acme/pushed", oid).read_bytes() == weights
        for rel in inline:
            assert (repo / rel).read_bytes() == (pushed.path / rel).read_bytes()

        # a second push to the existing repo (create_repo answers 409, exist_ok) is a new commit
        registry.publish(lora_dir_2, "medical")
        second = registry.push("medical@2", "acme/pushed")
        assert second != commit and git(repo, "rev-parse", "HEAD~1") == commit
        assert server.commits[-1]["lfs"] == [WEIGHTS]

        monkeypatch.setenv("HF_TOKEN", "wrong")
        with pytest.raises(RegistryError, match="401"):
            registry.push("medical@1", "acme/other")

    hub_env(olah.endpoint)
    pulled = registry.pull("acme/pushed", revision=commit, name="medical-copy")
    assert pulled.ref == "medical-copy@1"
    assert pulled.manifest["source"]["commit"] == commit
    for rel in ADAPTER_FILES:  # olah resolves the LFS pointer to the uploaded bytes
        assert pulled.manifest["files"][rel] == pushed.manifest["files"][rel]
        assert (pulled.path / rel).read_bytes() == (pushed.path / rel).read_bytes()
    assert pulled.manifest["base"] == pushed.manifest["base"]


def test_push_with_corrupted_lfs_upload_commits_nothing(
    registry: Registry, olah, hub_env, lfs_client, lora_dir, monkeypatch
):
    """Guards against the test server storing LFS bytes that do not match their oid: the
    client's object PUT is corrupted in transit, the server refuses it, no commit is made."""
    from huggingface_hub import lfs
    from huggingface_hub.utils import hf_raise_for_status, http_backoff

    def corrupted_put(operation, upload_url: str) -> None:
        with operation.as_file() as f:
            data = bytearray(f.read())
        data[-1] ^= 0xFF
        hf_raise_for_status(http_backoff("PUT", upload_url, data=bytes(data)))

    monkeypatch.setattr(lfs, "_upload_single_part", corrupted_put)
    with HubUploadServer(olah.mirrors) as server:
        hub_env(server.endpoint)
        v = registry.publish(lora_dir, "medical")
        with pytest.raises(Exception) as info:  # the client wraps the HTTP error
            registry.push(v.ref, "acme/corrupted")
        errors = error_chain(info.value)
        assert "400 Bad Request" in errors and "the uploaded bytes hash to sha256" in errors
        oid = hashlib.sha256((v.path / WEIGHTS).read_bytes()).hexdigest()
        assert not server.lfs_object("acme/corrupted", oid).exists()
        assert server.commits == []
        assert git(server.repo_dir("acme/corrupted"), "log", "--format=%s") == "initial commit"


def test_lfs_server_refuses_wrong_oid_size_and_unuploaded_objects(olah):
    """Guards the test server's own LFS checks, so the push tests above can trust it: bytes that
    do not hash to the oid, a wrong size, an unannounced PUT and a commit naming an object never
    uploaded are all refused, and the right bytes then go through."""
    with HubUploadServer(olah.mirrors) as server:
        create = {"organization": "acme", "name": "raw"}
        assert http("POST", f"{server.endpoint}/api/repos/create", create)[0] == 200
        data = b"\0weights" * 64
        oid = hashlib.sha256(data).hexdigest()
        lfs_url = f"{server.endpoint}/acme/raw.git/info/lfs/objects"
        commit_url = f"{server.endpoint}/api/models/acme/raw/commit/main"
        lfs_file = {"path": WEIGHTS, "algo": "sha256", "oid": oid, "size": len(data)}
        lfs_entry = {"key": "lfsFile", "value": lfs_file}
        ndjson = b"".join(json.dumps(line).encode() + b"\n"
                          for line in ({"key": "header", "value": {"summary": "w"}}, lfs_entry))

        status, answer = http("PUT", f"{lfs_url}/{oid}", data)
        assert status == 403 and "no batch request announced" in answer["message"]
        batch = {"operation": "upload", "transfers": ["basic", "multipart"], "hash_algo": "sha256",
                 "objects": [{"oid": oid, "size": len(data)}]}
        status, answer = http("POST", f"{lfs_url}/batch", batch)
        assert status == 200
        assert answer["objects"][0]["actions"]["upload"]["href"] == f"{lfs_url}/{oid}"

        corrupted = data[:-1] + b"!"
        status, answer = http("PUT", f"{lfs_url}/{oid}", corrupted)
        corrupted_oid = hashlib.sha256(corrupted).hexdigest()
        assert status == 400 and f"hash to sha256 {corrupted_oid}" in answer["message"]
        status, answer = http("PUT", f"{lfs_url}/{oid}", data + b"x")
        assert status == 400 and f"got {len(data) + 1} bytes" in answer["message"]
        assert http("POST", f"{lfs_url}/verify", {"oid": oid, "size": len(data)})[0] == 404
        status, answer = http("POST", commit_url, ndjson)
        assert status == 422 and "never uploaded" in answer["error"]
        assert not server.lfs_object("acme/raw", oid).exists() and server.commits == []

        assert http("PUT", f"{lfs_url}/{oid}", iter([data[:100], data[100:]]))[0] == 200  # chunked
        assert http("POST", f"{lfs_url}/verify", {"oid": oid, "size": len(data)})[0] == 200
        status, answer = http("POST", f"{lfs_url}/batch", batch)
        assert status == 200 and "actions" not in answer["objects"][0]  # stored: nothing to upload
        status, answer = http("POST", commit_url, ndjson)
        assert status == 200 and server.commits[-1]["lfs"] == [WEIGHTS]
        assert (server.repo_dir("acme/raw") / WEIGHTS).read_bytes() == lfs_pointer(oid, len(data))


def test_push_refuses_a_tampered_version(registry: Registry, olah, hub_env, lora_dir):
    with HubUploadServer(olah.mirrors) as server:
        hub_env(server.endpoint)
        v = registry.publish(lora_dir, "medical")
        target = v.path / "adapter_config.json"
        target.chmod(0o644)
        target.write_text(target.read_text().replace('"r": 8', '"r": 9'))
        with pytest.raises(RegistryError, match="no longer matches its manifest"):
            registry.push("medical", "acme/never")
        assert server.requests == []


def test_cli_pull_and_push(home, olah, hub_env, lfs_client, lora_dir, capsys):
    hub_env(olah.endpoint)
    repo = hub_repo(olah, "acme/cli")
    sha = commit_files(repo, adapter_files(lora_dir), "c")
    git(repo, "tag", "v1")
    assert main(["adapters", "pull", "acme/cli", "--revision", "v1", "--name", "cli-med"]) == 0
    assert capsys.readouterr().out == "cli-med@1\n"
    with HubUploadServer(olah.mirrors) as server:
        hub_env(server.endpoint)
        assert main(["adapters", "push", "cli-med@1", "acme/cli-pushed"]) == 0
        out = capsys.readouterr().out.strip()
        assert out == git(server.repo_dir("acme/cli-pushed"), "rev-parse", "HEAD") and out != sha
        assert server.commits[-1]["lfs"] == [WEIGHTS]  # the CLI push sends the weights over LFS
