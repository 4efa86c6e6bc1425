"""Base models: import, fingerprint, no-op re-add, errors, and the real SmolLM2 answering."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from loradock.registry import InvalidBaseError, NotFoundError, Registry
from loradock.registry.bases import fingerprint

from loradock.bases import import_base
from loradock.cli import main
from tests.conftest import TINY_BASE


def test_tiny_base_is_stored_with_fingerprint(tiny_base, session_home):
    assert tiny_base.name == TINY_BASE
    assert (tiny_base.path / "model.safetensors").is_file()
    assert (tiny_base.path / "tokenizer.json").is_file()
    assert fingerprint(tiny_base.path) == tiny_base.fingerprint
    assert Registry(session_home).base(TINY_BASE) == tiny_base


def test_fingerprint_ignores_dtype_but_not_shapes(tiny_base, tmp_path, tokenizer_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base.path, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    assert fingerprint(tmp_path / "bf16") == tiny_base.fingerprint

    from tests.conftest import build_tiny_llama

    other = build_tiny_llama(tmp_path / "other", tokenizer_dir)
    cfg = json.loads((other / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (other / "config.json").write_text(json.dumps(cfg))
    assert fingerprint(other) != tiny_base.fingerprint


def test_adding_same_base_twice_is_noop(tiny_base, home):
    info, created = import_base(Registry(home), tiny_base.path, name=TINY_BASE)
    assert not created and info.fingerprint == tiny_base.fingerprint


def test_same_name_different_weights_refused(tiny_base, tmp_path, tokenizer_dir, home):
    from tests.conftest import build_tiny_llama

    other = build_tiny_llama(tmp_path / "other", tokenizer_dir, seed=1)
    cfg = json.loads((other / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (other / "config.json").write_text(json.dumps(cfg))
    # Weights were saved for 128; rebuild them to match the new config.
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(other)).save_pretrained(other)
    with pytest.raises(Exception, match="already exists with different weights"):
        import_base(Registry(home), other, name=TINY_BASE)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing", "no such file"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "not a Hugging Face model directory"),
        (lambda p: (p / "x.txt").write_text("hi") and p / "x.txt", "expected a .gguf file"),
    ],
)
def test_bad_sources_give_clear_errors(home, tmp_path, make, message):
    with pytest.raises(InvalidBaseError, match=message):
        import_base(Registry(home), make(tmp_path), name="bad")
    assert not (home / "bases" / "bad").exists()


def test_unsupported_architecture_refused(tiny_base, tmp_path, home):
    src = tmp_path / "gpt"
    shutil.copytree(tiny_base.path, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidBaseError, match="unsupported architecture 'gpt2'"):
        import_base(Registry(home), src, name="gpt")


def test_pickle_only_model_refused(tmp_path, home, tiny_base):
    src = tmp_path / "pickled"
    src.mkdir()
    shutil.copy2(tiny_base.path / "config.json", src / "config.json")
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04junk")
    with pytest.raises(InvalidBaseError, match="safetensors only"):
        import_base(Registry(home), src, name="pickled")


def test_unknown_base_lists_known(tiny_base, home):
    with pytest.raises(NotFoundError, match=TINY_BASE):
        Registry(home).base("nope")


def test_cli_list_and_show_json(tiny_base, home, capsys):
    assert main(["bases", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert any(b["name"] == TINY_BASE and b["fingerprint"] == tiny_base.fingerprint for b in listed)
    assert main(["bases", "show", TINY_BASE, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["path"] == str(Path(home) / "bases" / TINY_BASE)
    assert shown["lora_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert main(["bases", "show", "nope"]) == 2
    assert "unknown base 'nope'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_smollm2_knows_the_capital_of_france(smollm2_base, quantize):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    kwargs = {"dtype": torch.bfloat16}
    if quantize == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
    model = AutoModelForCausalLM.from_pretrained(smollm2_base.path, **kwargs)
    tok = AutoTokenizer.from_pretrained(smollm2_base.path)
    inputs = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_cli_add_default_base_in_fresh_home(smollm2_base, tmp_path, monkeypatch, capsys):
    """`loradock bases add` then `bases list --json` in a fresh LORADOCK_HOME."""
    monkeypatch.setenv("LORADOCK_HOME", str(tmp_path / "fresh"))
    assert main(["bases", "add"]) == 0
    assert "added base smollm2-135m-instruct" in capsys.readouterr().out
    assert main(["bases", "add"]) == 0
    assert "already present" in capsys.readouterr().out
    assert main(["bases", "list", "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["name"] == "smollm2-135m-instruct"
    assert listed["fingerprint"] == smollm2_base.fingerprint


def test_base_accepts_a_stored_bases_model_directory_and_names_the_command_for_others(
        tiny_base, tmp_path, tokenizer_dir, home, capsys):
    registry = Registry(home)
    copy = shutil.copytree(tiny_base.path, tmp_path / "copy")  # another path, the same fingerprint
    assert registry.base(str(tiny_base.path)).name == registry.base(str(copy)).name == TINY_BASE

    from tests.conftest import build_tiny_model

    other = build_tiny_model(tmp_path / "other", tokenizer_dir, "llama", num_hidden_layers=3)
    with pytest.raises(NotFoundError, match=f"not in the registry; add it with `loradock bases add {other}`"):
        registry.base(str(other))
    with pytest.raises(NotFoundError, match="no such model directory"):
        registry.base("/path/to/model")
    # the CLI says the same, in one line and with exit 2 (serve stops before loading anything)
    assert main(["--home", str(home), "serve", "--base", str(other)]) == 2
    assert "loradock bases add" in capsys.readouterr().err


def test_bases_add_names_the_family_and_its_lora_layers_and_refuses_with_the_reason(tmp_path, tokenizer_dir, home,
                                                                                     capsys):
    from tests.conftest import build_tiny_model

    phi3 = build_tiny_model(tmp_path / "phi3", tokenizer_dir, "phi3")
    assert main(["bases", "add", str(phi3), "--name", "tiny-phi3"]) == 0
    assert "family phi3; LoRA served on: down_proj, gate_up_proj, o_proj, qkv_proj" in capsys.readouterr().out
    gpt2 = build_tiny_model(tmp_path / "gpt2", tokenizer_dir, "gpt2")
    assert main(["bases", "add", str(gpt2)]) == 2
    assert "unsupported architecture 'gpt2': its projections are Conv1D layers" in capsys.readouterr().err
