"""Generated benchmark adapters are real PEFT adapters that change the model, published once."""

from __future__ import annotations

import torch
from loradock.benchmarks.adapters import publish_random_adapters
from loradock.benchmarks.workload import adapter_specs
from peft import PeftModel
from transformers import AutoModelForCausalLM


def test_published_adapters_load_in_peft_and_change_outputs(tiny_base, registry):
    specs = adapter_specs(4)
    versions = publish_random_adapters(registry, tiny_base, specs, seed=1)
    assert [v.ref for v in versions] == [f"{s.name}@1" for s in specs]
    for v, s in zip(versions, specs, strict=True):
        assert v.manifest["rank"] == s.rank
        assert sorted(v.manifest["target_modules"]) == sorted(s.targets)
        assert v.manifest["base"]["fingerprint"] == tiny_base.fingerprint

    ids = torch.tensor([[101, 2000, 3000, 4000]])
    base = AutoModelForCausalLM.from_pretrained(tiny_base.path, dtype=torch.float32)
    with torch.no_grad():
        plain = base(ids).logits
        model = PeftModel.from_pretrained(base, versions[1].path)  # rank 16, attention + MLP
        adapted = model(ids).logits
    assert not torch.allclose(plain, adapted, atol=1e-3)


def test_rerun_reuses_and_versions_differ(tiny_base, registry):
    spec = adapter_specs(1)
    first = publish_random_adapters(registry, tiny_base, spec, seed=0)
    again = publish_random_adapters(registry, tiny_base, spec, seed=0)
    assert again == first and len(registry.versions(spec[0].name)) == 1
    two = publish_random_adapters(registry, tiny_base, spec, seed=0, versions=2)[0]
    assert two.version == 2 and two.digest != first[0].digest
