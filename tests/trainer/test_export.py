"""`loradock export`: a clean PEFT directory, or a merged full model whose greedy outputs equal
PeftModel's on the same base (unquantized, and a QLoRA adapter on the dequantized NF4 base)."""

from __future__ import annotations

import pytest
import torch
from loradock.registry.quantization import QuantizationRecipe
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from loradock.cli import main
from tests.adapters import make_lora_adapter

PROMPTS = ([1, 450, 7043, 310, 3444, 338], [1, 15043, 29892, 590, 1024])
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def adapter_dir(tiny_base, tmp_path_factory):
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    return make_lora_adapter(tiny_base.path, tmp_path_factory.mktemp("export") / "a", rank=8, targets=targets,
                             seed=21, scale=0.5)


@torch.inference_mode()
def greedy(model) -> list[list[int]]:
    out = []
    for ids in PROMPTS:
        x = torch.tensor([ids])
        tokens = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS,
                                do_sample=False, min_new_tokens=NEW_TOKENS)
        out.append(tokens[0, len(ids):].tolist())
    return out


def test_export_without_merge_is_a_clean_peft_directory(registry, tiny_base, adapter_dir, tmp_path, capsys):
    version = registry.publish(adapter_dir, "plain", base=tiny_base.name)
    out = tmp_path / "peft"
    assert main(["export", "plain@1", "--out", str(out)]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json",
                                                      "adapter_model.safetensors"]
    for name in ("adapter_model.safetensors", "README.md"):
        assert (out / name).read_bytes() == (version.path / name).read_bytes()


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32-base", "nf4-base"])
def test_merged_export_generates_what_peft_generates(registry, tiny_base, adapter_dir, tmp_path, capsys,
                                                     quantized):
    training = {"quantization": QuantizationRecipe.named("nf4", "float32").to_json()} if quantized else None
    version = registry.publish(adapter_dir, "qa", base=tiny_base.name, metadata={"training": training})
    out = tmp_path / "merged"
    assert main(["export", version.ref, "--out", str(out), "--merge", "--dtype", "fp32"]) == 0
    err = capsys.readouterr().err
    assert "[4/4] saving float32 weights" in err
    card = (out / "README.md").read_text()
    assert ("dequantized first" in card) is quantized

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    kwargs = {"dtype": torch.float32}
    if quantized:  # PEFT on the base the adapter was trained on: NF4, fp32 compute
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_base.path, **kwargs).eval()
    base_tokens = greedy(base)
    oracle = PeftModel.from_pretrained(base, version.path).eval()
    expected = greedy(oracle)
    assert greedy(merged) == expected
    assert expected != base_tokens  # the adapter changes the output, so the comparison can fail


def test_bad_exports_are_refused_and_write_nothing(registry, tiny_base, adapter_dir, tmp_path, capsys):
    registry.publish(adapter_dir, "bad", base=tiny_base.name)
    outs = tmp_path / "outs"
    full = outs / "full"
    full.mkdir(parents=True)
    (full / "keep.txt").write_text("mine")
    assert main(["export", "bad", "--out", str(full)]) == 2
    assert "is not an empty directory" in capsys.readouterr().err
    assert [p.name for p in full.iterdir()] == ["keep.txt"]

    assert main(["export", "bad", "--out", str(outs / "x"), "--dtype", "bf16"]) == 2
    assert "--dtype applies to merged exports" in capsys.readouterr().err
    assert main(["export", "nosuch@1", "--out", str(outs / "y")]) == 2
    assert "nosuch" in capsys.readouterr().err
    assert sorted(p.name for p in outs.iterdir()) == ["full"]
