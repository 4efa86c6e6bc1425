"""Signed versions: signing at publish and later, the trust policy, `verify`, and the Hub round trip."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from loradock.registry import DigestMismatchError, Registry
from loradock.registry.errors import InvalidAdapterError, SigningError, TrustPolicyError
from loradock.registry.signing import SIGNATURE_FILE
from loradock.registry.trust import TrustPolicy

from tests.registry.hub_server import HubUploadServer
from tests.registry.test_hub import lfs_client  # noqa: F401 - a fixture
from tests.signing_keys import make_key_pair, write_policy

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("keys")
    return {name: make_key_pair(root, name) for name in ("a", "b")}


def policy_for(tmp_path: Path, rules: dict[str, list[Path]]) -> TrustPolicy:
    return TrustPolicy.load(write_policy(tmp_path / "trust.yaml", rules))


def test_publish_signed_is_trusted_only_by_its_key(
        registry: Registry, lora_dir, keys, tmp_path):
    plain = registry.publish(lora_dir, "plain")
    signed = registry.publish(lora_dir, "medical/notes", sign_key=keys["a"][0])
    assert (signed.path / SIGNATURE_FILE).is_file()
    assert SIGNATURE_FILE not in signed.manifest["files"]  # not part of the content digest
    assert plain.manifest["signature"] is None
    trust_a = policy_for(tmp_path, {"medical/*": [keys["a"][1]], "*": [keys["b"][1]]})
    status = trust_a.check(registry.resolve("medical/notes"))
    assert status.trusted, status
    assert signed.manifest["signature"] == {"file": SIGNATURE_FILE, "signer": status.signer}
    unsigned = trust_a.check(registry.resolve("plain"))
    assert (unsigned.state, unsigned.signer) == ("unsigned", "")
    # first match wins: the same files under key A are not trusted where the rule names only B
    only_b = policy_for(tmp_path, {"medical/*": [keys["b"][1]], "*": [keys["a"][1]]})
    refused = only_b.check(registry.resolve("medical/notes"))
    assert refused.state == "untrusted" and "medical/*" in refused.reason, refused
    # the format is model_signing's own: its verifier accepts the version directory
    from model_signing import verifying

    verifying.Config().use_elliptic_key_verifier(public_key=keys["a"][1]).verify(
        signed.path, signed.path / SIGNATURE_FILE)
    assert [r.ok for r in registry.verify(policy=trust_a)] == [True, False]  # plain: unsigned


def test_the_first_matching_rule_decides_even_where_a_later_one_is_more_specific(
        registry: Registry, lora_dir, keys, tmp_path):
    """Guards picking the longest (most specific) matching pattern instead of the first: the
    documented rule is file order, so a broad rule above a narrow one wins."""
    registry.publish(lora_dir, "medical/notes", sign_key=keys["a"][0])
    version = registry.resolve("medical/notes")
    broad_first = policy_for(tmp_path, {"medical/*": [keys["b"][1]], "medical/notes": [keys["a"][1]]})
    assert broad_first.rule_for("medical/notes").pattern == "medical/*"
    refused = broad_first.check(version)
    assert refused.state == "untrusted" and "medical/*" in refused.reason, refused
    # the same rules the other way round trust it: the refusal above is the order's doing
    narrow_first = policy_for(tmp_path, {"medical/notes": [keys["a"][1]], "medical/*": [keys["b"][1]]})
    assert narrow_first.check(version).trusted


def test_resigned_by_another_key_or_swapped_weights_are_refused(registry: Registry, lora_dir, lora_dir_2,
                                                                keys, tmp_path):
    trust_a = policy_for(tmp_path, {"*": [keys["a"][1]]})
    registry.publish(lora_dir, "medical", sign_key=keys["a"][0])
    with pytest.raises(SigningError, match="already signed by key:"):
        registry.sign("medical@1", keys["b"][0])
    _, signer_b = registry.sign("medical@1", keys["b"][0], replace=True)
    status = trust_a.check(registry.resolve("medical@1"))
    assert (status.state, status.signer) == ("untrusted", signer_b)

    # An attacker who can write the registry swaps the weights and rewrites the manifest to match:
    # digests pass, the signature (by A, over the old weights) does not.
    registry.publish(lora_dir, "legal", sign_key=keys["a"][0])
    target = registry.resolve("legal").path
    evil = registry.publish(lora_dir_2, "evil").path
    manifest = json.loads((target / "manifest.json").read_text())
    for rel in ("adapter_config.json", WEIGHTS):
        (target / rel).chmod(0o644)
        shutil.copyfile(evil / rel, target / rel)
        manifest["files"][rel] = json.loads((evil / "manifest.json").read_text())["files"][rel]
    (target / "manifest.json").chmod(0o644)
    (target / "manifest.json").write_text(json.dumps(manifest))
    swapped = registry.resolve("legal")  # digest check passes: the manifest was rewritten too
    status = trust_a.check(swapped)
    assert status.state == "invalid" and WEIGHTS in status.reason, status
    [result] = registry.verify("legal")
    assert not result.ok and any("signs other content" in p for p in result.problems), result


def test_sign_later_keeps_digest_and_refuses_damaged_files(registry: Registry, lora_dir, keys, tmp_path):
    v = registry.publish(lora_dir, "support")
    generation = registry.generation()
    signed, key_id = registry.sign("support", keys["a"][0])
    assert registry.resolve("support").digest == v.digest
    assert registry.generation() == generation + 1  # servers re-check trust
    assert registry.sign("support", keys["a"][0]) == (signed, key_id)  # again: nothing changes
    [result] = registry.verify("support", policy_for(tmp_path, {"*": [keys["a"][1]]}))
    assert result.ok and (result.signer, result.trust) == (key_id, "trusted")
    weights = v.path / WEIGHTS
    weights.chmod(0o644)
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(DigestMismatchError, match="not signed"):
        registry.sign("support", keys["b"][0], replace=True)


def test_bad_keys_and_policies_are_named(registry: Registry, lora_dir, tmp_path, keys):
    bogus = tmp_path / "bogus.key"
    bogus.write_text("not a key")
    with pytest.raises(SigningError, match="not a usable PEM private key"):
        registry.publish(lora_dir, "x", sign_key=bogus)
    assert registry.list() == []  # nothing published
    with pytest.raises(SigningError, match="cannot read signing key"):
        registry.publish(lora_dir, "x", sign_key=tmp_path / "missing.key")
    with pytest.raises(TrustPolicyError) as err:
        TrustPolicy.load(write_policy(tmp_path / "p.yaml", {"a/*": [tmp_path / "nope.pub"],
                                                             "*": [keys["a"][0]]}))
    assert "nope.pub" in str(err.value) and "not a PEM public key" in str(err.value)


def test_a_signature_for_other_files_is_not_published(registry: Registry, lora_dir, lora_dir_2, keys,
                                                      tmp_path):
    signed = registry.publish(lora_dir, "a", sign_key=keys["a"][0])
    src = Path(shutil.copytree(lora_dir_2, tmp_path / "src"))
    shutil.copyfile(signed.path / SIGNATURE_FILE, src / SIGNATURE_FILE)
    with pytest.raises(InvalidAdapterError, match="signs other content"):
        registry.publish(src, "b")


@pytest.mark.usefixtures("lfs_client")
def test_signature_survives_hub_push_and_pull(registry: Registry, olah, hub_env, lora_dir, keys,
                                              monkeypatch, tmp_path):
    pushed = registry.publish(lora_dir, "medical", sign_key=keys["a"][0])
    with HubUploadServer(olah.mirrors, token="hf_secret") as server:
        hub_env(server.endpoint)
        monkeypatch.setenv("HF_TOKEN", "hf_secret")
        commit = registry.push("medical@1", "acme/signed")
    hub_env(olah.endpoint)
    pulled = registry.pull("acme/signed", revision=commit, name="medical-copy")
    assert (pulled.path / SIGNATURE_FILE).read_bytes() == (pushed.path / SIGNATURE_FILE).read_bytes()
    trust_a = policy_for(tmp_path, {"*": [keys["a"][1]]})
    assert trust_a.check(registry.resolve(pulled.ref)).trusted
    assert pulled.manifest["signature"]["signer"] == pushed.manifest["signature"]["signer"]


def test_cli_publish_sign_and_verify_with_a_policy(home: Path, lora_dir, keys, tmp_path, capsys):
    from loradock.cli import main

    policy = write_policy(tmp_path / "trust.yaml", {"*": [keys["a"][1]]})
    assert main(["adapters", "publish", str(lora_dir), "--name", "signed", "--sign-key", str(keys["a"][0])]) == 0
    assert main(["adapters", "publish", str(lora_dir), "--name", "later"]) == 0
    capsys.readouterr()
    assert main(["adapters", "verify", "--trust", str(policy)]) == 1  # `later` is unsigned
    out = capsys.readouterr().out
    assert "later@1: FAILED" in out and "not signed" in out and "1 ok, 1 failed (1 signed, 1 trusted)" in out
    assert main(["adapters", "sign", "later", "--key", str(keys["b"][0])]) == 0
    assert main(["adapters", "sign", "later", "--key", str(keys["a"][0])]) == 2  # another key's: refused
    assert "already signed by key:" in capsys.readouterr().err
    assert main(["adapters", "sign", "later", "--key", str(keys["a"][0]), "--replace"]) == 0
    capsys.readouterr()
    assert main(["adapters", "verify", "--trust", str(policy)]) == 0
    assert "2 ok, 0 failed (2 signed, 2 trusted)" in capsys.readouterr().out
