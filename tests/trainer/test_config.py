"""The training config: LLaMA-Factory names, overrides, and errors that name the key."""

from __future__ import annotations

import dataclasses

import pytest
from loradock.trainer.config import (
    TrainConfig,
    config_help,
    field_docs,
    load_config,
    parse_overrides,
)
from loradock.trainer.errors import ConfigError

MINIMAL = {"model_name_or_path": "tiny", "dataset": "a.json", "adapter_name": "demo"}


def test_llama_factory_config_is_read_with_its_own_names(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(
        "model_name_or_path: smollm2\nstage: sft\ndo_train: true\nfinetuning_type: lora\n"
        "lora_target: q_proj,v_proj\ndataset: alpaca_en,mine.jsonl\ntemplate: default\n"
        "cutoff_len: 512\nlearning_rate: 1.0e-4\nnum_train_epochs: 2.0\n"
        "per_device_train_batch_size: 2\ngradient_accumulation_steps: 4\nquantization_bit: 4\n"
        "lr_scheduler_type: cosine\nwarmup_ratio: 0.1\nval_size: 0.1\nadapter_name: medical\n"
        "aliases: staging\n"
    )
    config = load_config(path)
    assert config.lora_target == ["q_proj", "v_proj"]
    assert config.dataset == ["alpaca_en", "mine.jsonl"]
    assert config.aliases == ["staging"]
    assert (config.quantization_bit, config.gradient_accumulation_steps, config.learning_rate) == (4, 4, 1e-4)
    assert config.config_dir == tmp_path


def test_overrides_win_and_are_parsed_as_yaml_scalars(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("model_name_or_path: tiny\ndataset: a.json\nadapter_name: demo\nlora_rank: 8\n")
    config = load_config(path, ["lora_rank=32", "learning_rate=3e-4", "publish=false", "quantization_bit="])
    assert config.lora_rank == 32
    assert config.learning_rate == pytest.approx(3e-4)  # PyYAML reads "3e-4" as text; still a number
    assert config.publish is False
    assert config.quantization_bit is None
    assert parse_overrides(["dataset=a,b"]) == {"dataset": "a,b"}


def test_unknown_keys_are_named_with_the_nearest_valid_one():
    with pytest.raises(ConfigError) as e:
        load_config({**MINIMAL, "learning_rat": 1e-4, "lora_rnk": 8, "zzz": 1})
    message = str(e.value)
    assert "learning_rat: unknown key; did you mean 'learning_rate'?" in message
    assert "lora_rnk: unknown key; did you mean 'lora_rank'?" in message
    assert "zzz: unknown key" in message


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("lora_rank", "big", "lora_rank: expected a whole number, got 'big'"),
        ("publish", "maybe", "publish: expected true or false"),
        ("learning_rate", "fast", "learning_rate: expected a number"),
        ("lora_rank", 0, "lora_rank: must be >= 1"),
        ("lora_dropout", 1.5, "lora_dropout: must be in [0, 1)"),
        ("quantization_bit", 3, "quantization_bit: must be 4, 8 or empty"),
        ("template", " ", "template: empty"),
        ("quantization_method", "hqq", "quantization_method: 'hqq' is not supported"),
        ("deepspeed", "examples/deepspeed/ds_z3_config.json", "deepspeed: not supported"),
        ("report_to", "wandb", "report_to: 'wandb' is not supported; use none or tensorboard"),
        ("report_to", "none,tensorboard", "report_to: none cannot be combined"),
        ("eval_strategy", "steps", "eval_strategy: steps needs validation data"),
        ("eval_strategy", "sometimes", "eval_strategy: 'sometimes' is not one of no, steps, epoch"),
        ("warmup_steps", 2.5, "warmup_steps: must be a whole number of steps"),
        ("ddp_timeout", 0, "ddp_timeout: must be >= 1"),
        ("dataset_dir", "REMOTE:llamafactory/demo_data", "loradock trains offline"),
        ("finetuning_type", "full", "finetuning_type: 'full' is not supported"),
        ("stage", "dpo", "stage: 'dpo' is not supported"),
        ("lr_scheduler_type", "cyclic", "lr_scheduler_type: 'cyclic' is not one of"),
        ("max_steps", 0, "max_steps: must be >= 1, or -1"),
        ("val_size", 2.5, "val_size: must be a fraction"),
        ("eval_steps", 10, "eval_steps: needs a validation split"),
    ],
)
def test_type_and_range_errors_name_the_key(key, value, expected):
    with pytest.raises(ConfigError, match="invalid training config") as e:
        load_config({**MINIMAL, key: value})
    assert expected in str(e.value)


def test_required_keys_and_publish_destination():
    with pytest.raises(ConfigError) as e:
        load_config({})
    assert "model_name_or_path: required" in str(e.value)
    assert "dataset: required" in str(e.value)
    assert "adapter_name: required to publish" in str(e.value)
    assert load_config({**MINIMAL, "adapter_name": None, "publish": False}).publish is False


def test_bad_yaml_file_is_named(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("lora_rank: [8\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"missing\.yaml: config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(MINIMAL, ["lora_rank"])


def test_every_field_is_documented_in_help():
    docs = field_docs()
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    assert sorted(docs) == sorted(names)
    assert all(len(doc) > 15 for doc in docs.values())
    text = config_help()
    for name in names:
        assert f"  {name} (" in text
    assert docs["lora_target"] in text


def test_train_help_documents_every_key(capsys):
    from loradock.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: loradock train [-h] [--json] config [key=value ...]" in out
    for f in dataclasses.fields(TrainConfig):
        assert f"  {f.name} (" in out
    assert "torchrun --nproc_per_node N" in out


def test_an_adapter_the_runtime_cannot_serve_is_refused_before_training():
    """The registry's PEFT format rules, applied to the config: no run trains and then cannot be
    served. DoRA is servable, and so is every linear layer of the decoder (Phi's dense and fc1
    among them); LoRA on the output head or the embeddings is not."""
    assert TrainConfig(**MINIMAL, use_dora=True, lora_target=["q_proj", "down_proj"]).use_dora
    assert TrainConfig(**MINIMAL, lora_target=["q_proj", "dense", "fc1"]).lora_target == ["q_proj", "dense", "fc1"]
    with pytest.raises(ConfigError) as info:
        TrainConfig(**MINIMAL, lora_target=["q_proj", "lm_head", "embed_tokens"])
    assert ("lora_target: LoRA on embed_tokens, lm_head (the embeddings or the output head) is not served"
            in str(info.value))
