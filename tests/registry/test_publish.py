"""Publishing, resolving, listing, aliases, deletion and the change counter."""

from __future__ import annotations

import json
import stat

import pytest
import yaml
from loradock.registry import NotFoundError, Registry, RegistryError
from loradock.registry.fsutil import sha256_file

from tests.conftest import TINY_BASE


def test_publish_stores_a_complete_read_only_version(registry: Registry, lora_dir, tiny_base):
    v = registry.publish(lora_dir, "medical")
    assert (v.name, v.version, v.ref) == ("medical", 1, "medical@1")
    assert v.path == registry.root / "adapters" / "medical" / "versions" / "1"
    assert sorted(p.name for p in v.path.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "manifest.json",
    ]
    for f in v.path.iterdir():
        assert not f.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH), f
    for rel in ("adapter_config.json", "adapter_model.safetensors"):
        assert (v.path / rel).read_bytes() == (lora_dir / rel).read_bytes()
    m = v.manifest
    assert m == json.loads((v.path / "manifest.json").read_text())
    assert set(m["files"]) == {"README.md", "adapter_config.json", "adapter_model.safetensors"}
    for rel, entry in m["files"].items():
        assert entry == {"sha256": sha256_file(v.path / rel), "size": (v.path / rel).stat().st_size}
    # adapter_config names the base by path: the registry recognises it as the tiny base
    assert m["base"] == {"name": TINY_BASE, "fingerprint": tiny_base.fingerprint}
    assert (m["peft_type"], m["rank"], m["alpha"], m["use_rslora"]) == ("LORA", 8, 16, False)
    assert m["target_modules"] == ["q_proj", "v_proj"]
    assert m["source"] == {"kind": "import", "path": str(lora_dir.resolve())}
    assert (m["training"], m["dataset"], m["metrics"], m["parent"]) == (None, None, {}, None)
    assert len(v.digest) == 64


def test_model_card_has_hub_front_matter(registry: Registry, lora_dir):
    v = registry.publish(lora_dir, "medical", base=TINY_BASE, metadata={"metrics": {"eval_loss": 1.25}})
    text = (v.path / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["base_model"] == TINY_BASE
    assert meta["library_name"] == "peft"
    assert "lora" in meta["tags"]
    assert meta["metrics"] == {"eval_loss": 1.25}
    assert "# medical@1" in body


def test_refs_select_latest_version_and_alias(registry: Registry, lora_dir, lora_dir_2):
    v1 = registry.publish(lora_dir, "medical", aliases=["prod"])
    v2 = registry.publish(lora_dir_2, "medical")
    assert v2.version == 2 and v2.digest != v1.digest
    assert registry.resolve("medical") == v2
    assert registry.resolve("medical@latest") == v2
    assert registry.resolve("medical@1") == v1
    assert registry.resolve("medical@prod") == v1
    registry.tag("medical@2", "prod")
    assert registry.resolve("medical@prod") == v2
    assert registry.aliases("medical") == {"prod": 2}
    registry.untag("medical", "prod")
    assert registry.aliases("medical") == {}
    assert [v.version for v in registry.versions("medical")] == [1, 2]
    assert registry.versions("medical")[1].manifest["rank"] == 4


def test_list_shows_latest_of_each_name_including_namespaces(registry: Registry, lora_dir, lora_dir_2):
    assert registry.list() == []
    registry.publish(lora_dir, "medical")
    registry.publish(lora_dir_2, "medical")
    registry.publish(lora_dir, "acme/legal")
    assert [(v.name, v.version) for v in registry.list()] == [("acme/legal", 1), ("medical", 2)]
    assert registry.resolve("acme/legal@1").path == registry.root / "adapters/acme/legal/versions/1"


def test_namespace_and_plain_name_cannot_collide(registry: Registry, lora_dir):
    registry.publish(lora_dir, "acme/legal")
    with pytest.raises(RegistryError, match="namespace"):
        registry.publish(lora_dir, "acme")
    registry.publish(lora_dir, "medical")
    with pytest.raises(RegistryError, match="adapter name"):
        registry.publish(lora_dir, "medical/x")


def test_namespace_collision_is_checked_again_under_the_lock(registry: Registry, lora_dir, monkeypatch):
    """Two publishers (`acme/legal` and `acme`) that both passed the early check: the second
    one to take the `acme` lock is refused, and leaves no version behind."""
    registry.publish(lora_dir, "acme/legal")
    store = type(registry.adapters)
    real, calls = store._check_namespace, []
    # the early check ran before acme/legal existed (skip it); the one under the lock is real
    monkeypatch.setattr(store, "_check_namespace", lambda self, name: calls.append(name) or (
        real(self, name) if len(calls) > 1 else None))
    with pytest.raises(RegistryError, match="namespace"):
        registry.publish(lora_dir, "acme")
    assert calls == ["acme", "acme"]
    assert [v.name for v in registry.list()] == ["acme/legal"]


def test_unknown_refs_list_what_exists(registry: Registry, lora_dir):
    with pytest.raises(NotFoundError, match="none yet"):
        registry.resolve("medical")
    registry.publish(lora_dir, "medical", aliases=["prod"])
    with pytest.raises(NotFoundError, match=r"unknown adapter 'legal'; known adapters: medical"):
        registry.resolve("legal")
    with pytest.raises(NotFoundError, match=r"no version 7; versions: 1; aliases: prod -> 1"):
        registry.resolve("medical@7")
    with pytest.raises(NotFoundError, match=r"no alias 'staging'; versions: 1; aliases: prod -> 1"):
        registry.resolve("medical@staging")
    with pytest.raises(NotFoundError, match="no alias 'staging'"):
        registry.untag("medical", "staging")


def test_delete_refuses_aliased_version_unless_forced(registry: Registry, lora_dir, lora_dir_2):
    registry.publish(lora_dir, "medical", aliases=["prod", "canary"])
    registry.publish(lora_dir_2, "medical")
    with pytest.raises(RegistryError, match="canary, prod"):
        registry.delete("medical@1")
    assert registry.resolve("medical@1").version == 1
    gone = registry.delete("medical@1", force=True)
    assert not gone.path.exists()
    assert registry.aliases("medical") == {}
    assert [v.version for v in registry.versions("medical")] == [2]
    registry.delete("medical")  # the latest, unaliased
    assert registry.list() == []
    # numbers are never reused: the next publish is 3, not 1
    assert registry.publish(lora_dir, "medical").version == 3
    assert not list((registry.root / "adapters" / ".staging").iterdir())


def test_generation_moves_on_every_change(registry: Registry, lora_dir):
    seen = [registry.generation()]
    registry.publish(lora_dir, "medical")
    seen.append(registry.generation())
    registry.tag("medical@1", "prod")
    seen.append(registry.generation())
    registry.untag("medical", "prod")
    seen.append(registry.generation())
    registry.resolve("medical@1"), registry.list(), registry.verify()  # reads do not count
    seen.append(registry.generation())
    registry.delete("medical@1")
    seen.append(registry.generation())
    assert seen == [0, 1, 2, 3, 3, 4]
    assert Registry(registry.root).generation() == 4  # persisted, visible to other processes


def test_published_version_loads_in_peft_and_changes_outputs(registry: Registry, lora_dir, tiny_base):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    v = registry.publish(lora_dir, "medical")
    model = AutoModelForCausalLM.from_pretrained(tiny_base.path, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 200, 3000]])
    with torch.no_grad():
        before = model(ids).logits
        peft_model = PeftModel.from_pretrained(model, v.path)
        after = peft_model(ids).logits
        with peft_model.disable_adapter():
            disabled = peft_model(ids).logits
    assert torch.allclose(disabled, before)
    assert (after - before).abs().max() > 1e-3
