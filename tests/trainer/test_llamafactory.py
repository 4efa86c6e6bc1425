"""LLaMA-Factory SFT configs run as they are: its example key sets, its data/ folder, its templates.

The configs in data/llamafactory/examples/ carry the key sets and values of LLaMA-Factory's
own SFT examples (LoRA, QLoRA 4-bit, with an eval split); each is run from a folder holding
data/ (as `llamafactory-cli train` is run from its repository), with only
model_name_or_path overridden, on the tiny Llama given the chat template of the model the
example was written for. Each run must publish a registry version and leave the output
folder LLaMA-Factory leaves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from loradock.registry import Registry
from loradock.trainer import CheckpointError, ConfigError, load_config, train
from loradock.trainer.config import TrainConfig
from loradock.trainer.datasets import load_datasets, split
from loradock.trainer.lf_keys import IGNORED_KEYS, ignored_warning
from loradock.trainer.lf_templates import TEMPLATES, check_template, fitting_templates
from loradock.trainer.precision import Precision, pick_precision
from safetensors.torch import load_file
from transformers import AutoTokenizer

from loradock.cli import main

LF = Path(__file__).parent / "data" / "llamafactory"
QWEN3_LORA = LF / "examples" / "train_lora" / "qwen3_lora_sft.yaml"
QWEN3_QLORA = LF / "examples" / "train_qlora" / "qwen3_lora_sft_otfq.yaml"
LLAMA3_LORA = LF / "examples" / "train_lora" / "llama3_lora_sft.yaml"
PNG = b"\x89PNG\r\n\x1a\n"
RECORDS = 16  # identity.json (8) + alpaca_en_demo.json (8)


def base_with_template(tiny_base, template: str, out: Path) -> Path:
    """A local model folder: the tiny Llama's weights (linked) with another chat template."""
    out.mkdir(parents=True)
    for f in Path(tiny_base.path).iterdir():
        if f.suffix == ".safetensors":
            os.symlink(f, out / f.name)
        elif f.is_file() and f.name != "chat_template.jinja":
            shutil.copy2(f, out / f.name)
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())
    shutil.copy2(LF / "chat_templates" / f"{template}.jinja", out / "chat_template.jinja")
    return out


@pytest.fixture(scope="module")
def tiny_qwen3(tiny_base, tmp_path_factory) -> Path:
    return base_with_template(tiny_base, "qwen3_instruct_2507", tmp_path_factory.mktemp("b") / "tiny-qwen3")


@pytest.fixture(scope="module")
def tiny_llama3(tiny_base, tmp_path_factory) -> Path:
    return base_with_template(tiny_base, "llama3_instruct", tmp_path_factory.mktemp("b") / "tiny-llama3")


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A folder holding LLaMA-Factory's data/ (here: ours), made the working directory."""
    os.symlink(LF / "data", tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_cli(home: Path, *args: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["--home", str(home), "train", *map(str, args)])
    return code, out.getvalue()


def log_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and r.name.startswith("loradock")]


# --- end to end: the example configs as they are -------------------------------------------


def test_lora_example_runs_unchanged_and_publishes(workdir, home, tiny_qwen3, caplog):
    """qwen3_lora_sft.yaml with only model_name_or_path overridden: trains, publishes under the
    config's name, honours its schedule and plot_loss, and lays out output_dir as LLaMA-Factory."""
    caplog.set_level(logging.INFO)
    code, stdout = run_cli(home, QWEN3_LORA, f"model_name_or_path={tiny_qwen3}")
    assert code == 0
    assert stdout == "qwen3_lora_sft@1\n"  # no adapter_name in a LLaMA-Factory config: the file's name
    version = Registry(home).resolve("qwen3_lora_sft@1")
    training, metrics = version.manifest["training"], version.manifest["metrics"]
    assert (training["template"], training["lora_rank"], training["cutoff_len"]) == ("qwen3_nothink", 8, 2048)
    assert version.manifest["dataset"]["records"] == RECORDS
    assert [f["dataset"] for f in version.manifest["dataset"]["files"]] == ["identity", "alpaca_en_demo"]
    # 16 examples, batch 1 x 8 accumulation = 2 steps an epoch, 3 epochs.
    assert metrics["steps"] == 6 and math.isfinite(metrics["train_loss"])

    # One warning line names every key set to ask for something loradock does not do, with why;
    # a second notes that bf16 cannot apply on this CPU.
    warned = warnings_of(caplog)
    assert len(warned) == 2, warned
    ignored, note = warned
    assert ignored.startswith("warning: ignored LLaMA-Factory keys: trust_remote_code: true (loradock never "
                              "runs code from a model repository")
    assert "preprocessing_num_workers: 16 (" in ignored and "dataloader_num_workers: 4 (" in ignored
    assert note.startswith("note: bf16: true has no effect on cpu: loradock trains in float32")

    # cosine schedule with warmup_ratio 0.1: ceil(0.6) = 1 warm-up step, then half a cosine to 0.
    lrs = [r["lr"] for r in log_records(workdir / "saves/qwen3-4b/lora/sft") if "lr" in r]
    expected = [1e-4 * 0.5 * (1 + math.cos(math.pi * (s - 1) / 5)) for s in range(1, 7)]
    assert lrs == pytest.approx(expected, rel=1e-6, abs=1e-12)

    # The output folder LLaMA-Factory leaves, plus loradock's own files; save_steps 500 > 6: no checkpoints.
    out = workdir / "saves" / "qwen3-4b" / "lora" / "sft"
    assert (out / "training_loss.png").read_bytes().startswith(PNG)
    assert not (out / "training_eval_loss.png").exists()  # no eval data in this config
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (out / name).samefile(out / "adapter" / name) or (out / name).read_bytes() == (
            out / "adapter" / name).read_bytes()
    results = json.loads((out / "all_results.json").read_text())
    assert results["epoch"] == 3.0 and results["train_loss"] == pytest.approx(
        sum(r["loss"] for r in log_records(out) if "loss" in r) / 6)
    assert not list(out.glob("checkpoint-*"))
    published = load_file(str(version.path / "adapter_model.safetensors"))
    assert published.keys() == load_file(str(out / "adapter_model.safetensors")).keys()


def test_qlora_example_runs_unchanged_on_the_4bit_base(workdir, home, tiny_qwen3):
    """qwen3_lora_sft_otfq.yaml (quantization_bit 4, quantization_method bnb) trains QLoRA on CPU."""
    code, stdout = run_cli(home, QWEN3_QLORA, f"model_name_or_path={tiny_qwen3}")
    assert code == 0 and stdout == "qwen3_lora_sft_otfq@1\n"
    manifest = Registry(home).resolve("qwen3_lora_sft_otfq@1").manifest
    assert manifest["metrics"]["quantization_bit"] == 4 and manifest["metrics"]["steps"] == 6
    # loradock's default recipe: no double quantization (LLaMA-Factory's default is true)
    assert (manifest["training"]["quantization_method"], manifest["training"]["double_quantization"]) == ("bnb", False)
    assert manifest["training"]["quantization"]["double_quant"] is False
    assert math.isfinite(manifest["metrics"]["train_loss"])
    assert (workdir / "saves/qwen3-4b/lora/sft/training_loss.png").read_bytes().startswith(PNG)


def test_eval_example_holds_out_what_llama_factory_holds_out(workdir, home, tiny_llama3):
    """llama3_lora_sft.yaml (template llama3, val_size 0.1, eval_strategy steps) on a Llama 3
    chat template: the held-out records are those of datasets' train_test_split(0.1, seed=42)."""
    code, stdout = run_cli(home, LLAMA3_LORA, f"model_name_or_path={tiny_llama3}")
    assert code == 0 and stdout == "llama3_lora_sft@1\n"
    manifest = Registry(home).resolve("llama3_lora_sft@1").manifest
    # ceil(0.1 * 16) = 2 held out; 14 / (1 x 8) = 2 steps an epoch.
    assert (manifest["dataset"]["train_examples"], manifest["dataset"]["eval_examples"]) == (14, 2)
    assert manifest["metrics"]["steps"] == 6 and math.isfinite(manifest["metrics"]["eval_loss"])
    out = workdir / "saves" / "llama3-8b" / "lora" / "sft"
    assert (out / "training_eval_loss.png").read_bytes().startswith(PNG)
    assert json.loads((out / "eval_results.json").read_text())["eval_loss"] == manifest["metrics"]["eval_loss"]
    # eval_steps 500 > 6 steps: only the final evaluation.
    assert [r["step"] for r in log_records(out) if "eval_loss" in r] == [6]


def test_data_parallel_example_runs_under_torchrun(workdir, home, tiny_qwen3):
    """LLaMA-Factory's DeepSpeed-free multi-GPU run (FORCE_TORCHRUN=1) is torchrun here: two CPU
    processes on gloo with the config's ddp_timeout (180000000 s), one published version."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "LORADOCK_HOME": str(home), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [str(bin_dir / "torchrun"), "--standalone", "--nproc_per_node", "2", str(bin_dir / "loradock"),
         "train", str(QWEN3_LORA), f"model_name_or_path={tiny_qwen3}"],
        env=env, capture_output=True, text=True, timeout=600, cwd=workdir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["qwen3_lora_sft@1"]
    metrics = Registry(home).resolve("qwen3_lora_sft@1").manifest["metrics"]
    # 16 examples over 2 ranks, batch 1 x 8 accumulation: 1 step an epoch, 3 epochs.
    assert (metrics["world_size"], metrics["steps"]) == (2, 3)
    assert result.stderr.count("ignored LLaMA-Factory keys") == 1  # rank 0 only


# --- keys ----------------------------------------------------------------------------------


def lf_config(path: Path = QWEN3_LORA) -> dict:
    return yaml.safe_load(path.read_text())


def test_every_key_of_the_examples_is_accepted():
    """Guards against a LLaMA-Factory example key becoming 'unknown key' again."""
    for path in (QWEN3_LORA, QWEN3_QLORA, LLAMA3_LORA):
        raw = lf_config(path)
        config = load_config(path)
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        assert set(raw) <= fields | set(IGNORED_KEYS), path
        assert config.ignored == {k: v for k, v in raw.items() if k in IGNORED_KEYS}


def test_a_misspelled_key_still_gets_did_you_mean(tmp_path):
    """Guards the other side of accepting LLaMA-Factory keys: a typo is not silently ignored."""
    text = QWEN3_LORA.read_text().replace("gradient_accumulation_steps:", "gradient_acumulation_steps:")
    text = text.replace("preprocessing_num_workers:", "preprocesing_num_workers:")
    path = tmp_path / "typo.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    message = str(e.value)
    assert message.startswith("invalid training config (2 problems):")
    assert "gradient_acumulation_steps: unknown key; did you mean 'gradient_accumulation_steps'?" in message
    assert "preprocesing_num_workers: unknown key; did you mean 'preprocessing_num_workers'?" in message


def test_deepspeed_is_refused_with_the_way_to_run_data_parallel():
    with pytest.raises(ConfigError) as e:
        load_config(QWEN3_LORA, ["deepspeed=examples/deepspeed/ds_z3_config.json"])
    assert "deepspeed: not supported" in str(e.value)
    assert "torchrun --nproc_per_node N loradock train CONFIG" in str(e.value)


def test_ignored_keys_warn_only_when_they_ask_for_something():
    assert ignored_warning({"trust_remote_code": False, "dataloader_num_workers": 0,
                            "preprocessing_num_workers": 1, "overwrite_cache": True}) is None
    line = ignored_warning({"trust_remote_code": True, "ray_num_workers": 4, "ray_run_name": "x"})
    assert "\n" not in line
    # Keys sharing a reason are named together, the reason once.
    assert line.count("USE_RAY=1") == 1 and "ray_num_workers: 4, ray_run_name: x (" in line


def test_val_size_and_eval_dataset_are_exclusive_as_in_llama_factory():
    with pytest.raises(ConfigError, match="val_size, eval_dataset: choose one"):
        load_config(QWEN3_LORA, ["val_size=0.1", "eval_dataset=alpaca_en_demo"])


def test_help_lists_the_ignored_keys_with_their_reasons(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "LLaMA-Factory keys accepted with no effect" in out
    for key in IGNORED_KEYS:
        assert f"\n  {key}\n" in out


# --- templates -----------------------------------------------------------------------------


def tokenizer_with(tiny_base, template: str | None):
    tokenizer = AutoTokenizer.from_pretrained(tiny_base.path)
    if template:
        tokenizer.chat_template = (LF / "chat_templates" / f"{template}.jinja").read_text()
    return tokenizer


@pytest.mark.parametrize(
    ("chat_template", "fits"),
    [
        ("qwen3_instruct_2507", ["chatml", "qwen3_nothink", "qwen3_5_nothink", "smollm", "yi"]),
        # The hybrid template rewrites earlier answers, so only one-turn conversations can be
        # trained on it; on those LLaMA-Factory's qwen3 (empty <think> block) renders the same.
        ("qwen3_hybrid", ["qwen3", "qwen3_5"]),
        ("llama3_instruct", ["llama3"]),
        # SmolLM2's default system prompt has no final full stop; LLaMA-Factory's smollm2 has one.
        (None, []),
    ],
)
def test_templates_that_fit_a_base_are_those_that_render_like_it(tiny_base, chat_template, fits):
    """Guards the fit rule both ways: a fitting name refused, or a differing one accepted."""
    assert fitting_templates(tokenizer_with(tiny_base, chat_template)) == fits


def test_a_template_that_does_not_fit_names_the_difference_and_the_ones_that_fit(tiny_base):
    tokenizer = tokenizer_with(tiny_base, "qwen3_instruct_2507")
    check_template("qwen3_nothink", tokenizer)
    check_template("default", tokenizer)
    with pytest.raises(ConfigError) as e:
        check_template("qwen3", tokenizer)
    assert "template: 'qwen3' does not render conversations as the base model's own chat template" in str(e.value)
    assert "qwen3 writes '…sistant\\n<think>\\n\\n</think>" in str(e.value)
    assert "templates that fit this base: chatml, qwen3_nothink, qwen3_5_nothink, smollm, yi" in str(e.value)
    with pytest.raises(ConfigError, match=r"'qwen3_nothnk' is not a LLaMA-Factory template loradock knows "
                                          r"\(did you mean 'qwen3_nothink'\?\)"):
        check_template("qwen3_nothnk", tokenizer)
    with pytest.raises(ConfigError, match=r"None of the \d+ LLaMA-Factory templates loradock knows fits this base; "
                                          r"use template: default"):
        check_template("smollm2", tokenizer_with(tiny_base, None))


def test_known_templates_render_as_llama_factory_writes_them():
    """Spot checks of the transcription against LLaMA-Factory's template.py."""
    from loradock.trainer.lf_templates import render

    conv = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
            {"role": "assistant", "content": "A"}]
    assert render(TEMPLATES["llama2"], conv, "<s>", "</s>") == "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nU [/INST]A</s>"
    assert render(TEMPLATES["gemma"], conv, "<bos>", "<eos>") == (
        "<bos><start_of_turn>user\nS\n\nU<end_of_turn>\n<start_of_turn>model\nA<end_of_turn>\n")
    assert render(TEMPLATES["qwen3"], conv[1:], None, "<|im_end|>") == (
        "<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nA<|im_end|>\n")
    assert render(TEMPLATES["glm4"], conv[1:], None, "<eos>") == "[gMASK]<sop><|user|>\nU<|assistant|>\nA<eos>"


# --- data selection ------------------------------------------------------------------------


def test_split_draws_what_datasets_train_test_split_draws():
    """Guards val_size's LLaMA-Factory meaning: a fraction rounds up, and the held-out records are
    the first of numpy.random.default_rng(seed).permutation(n), in that order (as in datasets)."""
    convs = [[{"role": "user", "content": str(i)}] for i in range(16)]
    train_part, val = split(convs, 0.1, seed=42)
    order = np.random.default_rng(42).permutation(16).tolist()
    assert len(val) == 2  # ceil(1.6); rounding to nearest would also give 2, so check 0.15 too
    assert val == [convs[i] for i in order[:2]] and train_part == [convs[i] for i in order[2:]]
    assert len(split(convs, 0.15, seed=42)[1]) == 3  # ceil(2.4) = 3, not round(2.4) = 2


def test_eval_dataset_and_max_samples_select_as_llama_factory(tiny_config, registry):
    """eval_dataset replaces the split; max_samples takes the first N of every dataset, eval too."""
    config = {**tiny_config, "dataset": "identity", "eval_dataset": "alpaca_en_demo", "val_size": 0,
              "max_samples": 5, "max_steps": 1, "dataset_dir": str(LF / "data")}
    version = train(config)
    record = version.manifest["dataset"]
    assert (record["train_examples"], record["eval_examples"]) == (5, 5)
    assert [f["path"] for f in record["eval"]["files"]] == [str(LF / "data" / "alpaca_en_demo.json")]
    identity = json.loads((LF / "data" / "identity.json").read_text())
    first_five = load_datasets(["identity"], LF / "data", max_samples=5).conversations
    assert [c[-1]["content"] for c in first_five] == [r["output"] for r in identity[:5]]
    assert record["digest"] == load_datasets(["identity"], LF / "data", max_samples=5).digest
    assert version.manifest["metrics"]["eval_loss"] > 0


def test_a_dataset_file_is_found_as_given_when_not_in_dataset_dir(tmp_path, monkeypatch):
    """dataset_dir now defaults to LLaMA-Factory's data/; a plain file name still resolves."""
    (tmp_path / "mine.json").write_text(json.dumps([{"instruction": "q", "output": "a"}]))
    monkeypatch.chdir(tmp_path)
    assert len(load_datasets(["mine.json"], "data").conversations) == 1


# --- keys with a meaning here --------------------------------------------------------------


def test_save_only_model_checkpoints_cannot_be_resumed(tiny_config, tmp_path):
    config = {**tiny_config, "publish": False, "max_steps": 2, "save_steps": 1, "save_only_model": True}
    train(config)
    checkpoint = Path(config["output_dir"]) / "checkpoint-2"
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "trainer_state.json"]
    with pytest.raises(CheckpointError, match="saved with save_only_model: true"):
        train({**config, "output_dir": str(tmp_path / "again"), "resume_from_checkpoint": str(checkpoint)})


def test_eval_strategy_epoch_evaluates_at_every_epoch_end(tiny_config):
    # 20 training examples, batch 8: 3 steps an epoch; 7 steps end inside the third epoch.
    config = {**tiny_config, "publish": False, "max_steps": 7, "eval_strategy": "epoch"}
    train(config)
    evals = [r["step"] for r in log_records(Path(config["output_dir"])) if "eval_loss" in r]
    assert evals == [3, 6, 7]  # two epoch ends, then the final evaluation


def test_report_to_tensorboard_without_the_package_fails_before_training(tiny_config, registry, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match=r"report_to: tensorboard needs the tensorboard package.*pip install tensorboard"):
        train({**tiny_config, "report_to": "tensorboard"})
    assert registry.list() == [] and not Path(tiny_config["output_dir"]).exists()


def test_report_to_tensorboard_writes_event_files(tiny_config):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = {**tiny_config, "publish": False, "max_steps": 3, "report_to": "tensorboard"}
    train(config)
    events = EventAccumulator(str(Path(config["output_dir"]) / "runs"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    assert [e.step for e in events.Scalars("eval/loss")] == [3]


def test_ddp_timeout_is_the_process_groups_timeout(monkeypatch):
    """Guards ddp_timeout reaching init_process_group (torchrun above proves a huge value works)."""
    from datetime import timedelta

    import torch.distributed as dist
    from loradock.trainer import distributed

    seen = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: seen.update(kw))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    distributed.init_world("cpu", 180000000)
    assert seen == {"backend": "gloo", "timeout": timedelta(seconds=180000000)}


def test_bf16_and_fp16_are_mapped_per_device():
    cpu = torch.device("cpu")
    # neither flag asked for: CPU trains in float32, no autocast, nothing to note
    assert pick_precision(False, False, cpu) == Precision(torch.float32, None, None)
    for bf16, fp16 in ((True, False), (False, True)):
        precision = pick_precision(bf16, fp16, cpu)
        assert (precision.base_dtype, precision.autocast_dtype) == (torch.float32, None)
        assert "has no effect on cpu" in precision.note


@pytest.mark.parametrize(("bf16_ok", "bf16", "fp16", "base", "autocast", "noted"), [
    (True, True, False, torch.bfloat16, torch.bfloat16, False),
    (False, True, False, torch.float32, None, True),  # no bfloat16 units: float32, said so
    (True, False, True, torch.float16, torch.float16, False),
    (False, False, True, torch.float16, torch.float16, False),
    (True, False, False, torch.bfloat16, None, False),  # half the memory where the GPU has it
    (False, False, False, torch.float32, None, False),
])
def test_bf16_and_fp16_on_cuda(monkeypatch, bf16_ok, bf16, fp16, base, autocast, noted):
    """The CUDA branch, with the GPU's bfloat16 support faked (no GPU needed)."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_ok)
    precision = pick_precision(bf16, fp16, torch.device("cuda"))
    assert (precision.base_dtype, precision.autocast_dtype) == (base, autocast)
    assert (precision.note is not None) == noted


def test_warmup_steps_wins_over_warmup_ratio():
    base = {"model_name_or_path": "x", "dataset": "a.json", "adapter_name": "a"}
    assert load_config({**base, "warmup_ratio": 0.1}).warmup_steps_for(100) == 10
    assert load_config({**base, "warmup_ratio": 0.1, "warmup_steps": 3}).warmup_steps_for(100) == 3
    assert load_config({**base, "warmup_steps": 0.25}).warmup_steps_for(10) == 3  # a fraction, rounded up


def test_double_quantization_reaches_bitsandbytes(tiny_base):
    from loradock.trainer.model import load_base, quantization_recipe

    for double in (True, False):
        config = load_config({"model_name_or_path": "x", "dataset": "a.json", "adapter_name": "a",
                              "quantization_bit": 4, "double_quantization": double})
        recipe = quantization_recipe(config, torch.device("cpu"))
        assert (recipe.quant_type, recipe.double_quant, recipe.compute_dtype) == ("nf4", double, "float32")
        model = load_base(Path(tiny_base.path), recipe, torch.device("cpu"))
        assert model.config.quantization_config.bnb_4bit_use_double_quant is double
