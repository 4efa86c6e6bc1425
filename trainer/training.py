"""`train(config)`: setup -> fit -> publish, the whole run in one readable place.

setup   checks the config against the registry, loads and tokenizes the data,
        builds the model, optimizer and schedule (or restores a checkpoint);
fit     is the loop in `loop.py`;
publish stores the adapter (never merged into the base) as a new version, on
        rank 0 only; a run that fails anywhere publishes nothing.

Under `torchrun` / `accelerate launch` every process runs this same code with
DistributedDataParallel; each trains on its shard of every batch.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel
from transformers import get_scheduler

from . import outputs, publish
from .checkpoint import PREFIX, TrainState, find_checkpoint, load_checkpoint
from .config import TrainConfig, load_config
from .datasets import LoadedDatasets, load_datasets, split
from .distributed import World, broadcast_from_main, close_world, init_world, local_rank_from_env
from .errors import ConfigError, TrainerError
from .lf_keys import ignored_warning
from .lf_templates import check_template
from .loop import LOG_FILE, FitResult, LoopSettings, fit, steps_per_epoch
from .model import build_model, load_tokenizer, pick_device, quantization_recipe
from .precision import pick_precision
from .reporting import check_reporters, open_sinks
from .templates import TokenizedSplit, tokenize_split

log = logging.getLogger(__name__)

ADAPTER_SUBDIR = "adapter"
CONFIG_FILE = "train_config.yaml"


@dataclass
class Run:
    """Everything `fit` and `publish` need, built by `setup`."""

    config: TrainConfig
    world: World
    device: torch.device
    registry: publish.Registry
    base: publish.ResolvedBase
    parent: publish.Parent | None
    destination: str | None
    output_dir: Path
    data: LoadedDatasets
    eval_data: LoadedDatasets | None  # eval_dataset, when given
    train: TokenizedSplit
    val: TokenizedSplit
    model: torch.nn.Module  # the PeftModel
    optimizer: torch.optim.Optimizer
    scheduler: object
    settings: LoopSettings
    state: TrainState
    pad_id: int


def train(
    config_or_path: str | Path | Mapping | TrainConfig,
    overrides: Sequence[str] | Mapping | None = None,
    registry: publish.Registry | str | Path | None = None,
) -> publish.AdapterVersion | None:
    """Train a LoRA adapter and publish it; returns the new AdapterVersion (None if publish: false).

    `config_or_path` is a YAML path, a mapping or a TrainConfig; `overrides` are
    `key=value` strings or a mapping that win over it; `registry` is a Registry
    or a root path (default: $LORADOCK_HOME).
    """
    config = _as_config(config_or_path, overrides)
    device = pick_device(config.device, local_rank_from_env())
    world = init_world(device.type, config.ddp_timeout)
    sinks = []
    try:
        run = setup(config, publish.open_registry(registry), world, device)
        sinks = open_sinks(config.reporters, run.output_dir) if world.is_main else []
        result = fit(
            run.model if world.size == 1 else _ddp(run.model, device),
            run.model, run.optimizer, run.scheduler, run.train.examples, run.val.examples,
            state=run.state, settings=run.settings, world=world, device=device,
            pad_id=run.pad_id, output_dir=run.output_dir,
            checkpoint_meta={"config": config.to_dict(), "dataset_digest": run.data.digest},
            sinks=sinks,
        )
        return finish(run, result)
    finally:
        for sink in sinks:
            sink.close()
        close_world(world)


def setup(config: TrainConfig, registry: publish.Registry, world: World, device: torch.device) -> Run:
    """Check, load and build everything; nothing is trained or written to the registry yet."""
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    _log_settings(config, device, world)
    check_reporters(config.reporters)
    base = publish.resolve_base(config.model_name_or_path, registry)
    parent = publish.resolve_parent(config.parent, registry, base) if config.parent else None
    destination = publish.destination(config)
    tokenizer = load_tokenizer(base.path)
    check_template(config.template, tokenizer)

    data = load_datasets(config.dataset, config.dataset_dir, config_dir=config.config_dir,
                         max_samples=config.max_samples)
    eval_data = None
    if config.eval_dataset:
        eval_data = load_datasets(config.eval_dataset, config.dataset_dir, config_dir=config.config_dir,
                                  max_samples=config.max_samples)
        train_convs, val_convs = data.conversations, eval_data.conversations
    else:
        train_convs, val_convs = split(data.conversations, config.val_size, config.seed)
    train_split = tokenize_split(tokenizer, train_convs, config.cutoff_len)
    val_split = tokenize_split(tokenizer, val_convs, config.cutoff_len)
    if not train_split.examples:
        raise TrainerError(
            f"no training examples left: all {len(train_convs)} lost their answers to cutoff_len "
            f"{config.cutoff_len}; raise cutoff_len"
        )
    _log_data(data, train_split, val_split, config, world)
    output_dir = _prepare_output_dir(config, world, destination)  # only once the input is known good

    model = build_model(config, base.path, device, parent.path if parent else None)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=config.learning_rate, weight_decay=config.weight_decay,
    )
    settings = _loop_settings(config, len(train_split.examples), world, device)
    scheduler = get_scheduler(
        config.lr_scheduler_type, optimizer,
        num_warmup_steps=config.warmup_steps_for(settings.total_steps),
        num_training_steps=settings.total_steps,
    )
    state = TrainState()
    if config.resume_from_checkpoint:
        checkpoint = find_checkpoint(config.resume_from_checkpoint, output_dir)
        state = load_checkpoint(checkpoint, model, optimizer, scheduler, config=config.to_dict(),
                                dataset_digest=data.digest, rank=world.rank, world_size=world.size)
        if world.is_main:
            log.info("resuming from %s at step %d of %d", checkpoint, state.step, settings.total_steps)
    return Run(config, world, device, registry, base, parent, destination, output_dir, data,
               eval_data, train_split, val_split, model, optimizer, scheduler, settings, state,
               tokenizer.pad_token_id)


def finish(run: Run, result: FitResult) -> publish.AdapterVersion | None:
    """Save the adapter into output_dir and publish it (rank 0); every rank returns the version."""
    if not all(math.isfinite(x) for x in result.last_losses):  # a NaN loss would poison the adapter
        raise TrainerError(
            f"training diverged (loss is not finite at step {result.state.step}); nothing was "
            "published. Lower learning_rate or keep max_grad_norm > 0"
        )
    version, error = None, None
    if run.world.is_main:
        try:
            version = _save_and_publish(run, result)
        except Exception as e:  # other ranks must learn of it, or they wait forever below
            error = e
    mine = ("failed", str(error)) if error else ("ok", version.ref if version else None)
    outcome = broadcast_from_main(mine, run.world)
    if error is not None:
        raise error
    if outcome[0] == "failed":
        raise TrainerError(f"rank 0 could not save or publish the adapter: {outcome[1]}")
    if version is None and outcome[1] is not None:
        version = run.registry.resolve(outcome[1])
    return version


def _save_and_publish(run: Run, result: FitResult) -> publish.AdapterVersion | None:
    adapter_dir = run.output_dir / ADAPTER_SUBDIR
    shutil.rmtree(adapter_dir, ignore_errors=True)
    run.model.save_pretrained(adapter_dir)
    metrics = _metrics(run, result)
    records = outputs.read_log(run.output_dir / LOG_FILE)
    _write_lf_outputs(run, adapter_dir, metrics, records)
    metrics["curve"] = outputs.loss_curve(records)
    log.info("trained %d steps in %.1f s: loss %s -> %s, eval loss %s", result.state.step,
             result.wall_time_s, _fmt(metrics["initial_loss"]), _fmt(metrics["train_loss"]),
             _fmt(result.eval_loss))
    if run.destination is None:
        log.info("publish: false; the adapter is in %s", adapter_dir)
        return None
    return publish.publish_adapter(
        run.registry, adapter_dir, run.destination, run.base,
        aliases=run.config.aliases, training=run.config.to_dict(),
        quantization=quantization_recipe(run.config, run.device),
        dataset=_dataset_record(run), metrics=metrics, parent=run.parent,
        sign_key=run.config.sign_key,
    )


# --- helpers -------------------------------------------------------------------------------


def _as_config(config_or_path, overrides) -> TrainConfig:
    if isinstance(config_or_path, TrainConfig):
        config = load_config({**config_or_path.to_dict(), **config_or_path.ignored}, overrides)
        config.config_dir = config_or_path.config_dir
        return config
    return load_config(config_or_path, overrides)


def _ddp(model: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _write_lf_outputs(run: Run, adapter_dir: Path, metrics: dict, records: list[dict]) -> None:
    """The files LLaMA-Factory leaves in its output_dir (see outputs.py)."""
    outputs.link_adapter(adapter_dir, run.output_dir)
    outputs.write_results(run.output_dir, records, epoch=metrics["epochs"],
                          runtime_s=metrics["wall_time_s"], eval_loss=metrics["eval_loss"])
    if run.config.plot_loss:
        for path in outputs.plot_losses(run.output_dir, records):
            log.info("plot_loss: %s", path)


def _loop_settings(config: TrainConfig, n_train: int, world: World, device: torch.device) -> LoopSettings:
    settings = LoopSettings(
        batch_size=config.per_device_train_batch_size,
        eval_batch_size=config.per_device_eval_batch_size,
        accumulation=config.gradient_accumulation_steps,
        total_steps=0,
        max_grad_norm=config.max_grad_norm,
        logging_steps=config.logging_steps,
        eval_steps=config.eval_interval,
        save_steps=config.save_steps,
        seed=config.seed,
        autocast_dtype=pick_precision(config.bf16, config.fp16, device).autocast_dtype,
        eval_each_epoch=config.periodic_eval == "epoch",
        model_only_checkpoints=config.save_only_model,
    )
    per_epoch = steps_per_epoch(n_train, world, settings)
    settings.total_steps = (
        config.max_steps if config.max_steps > 0 else max(1, math.ceil(config.num_train_epochs * per_epoch))
    )
    return settings


def _prepare_output_dir(config: TrainConfig, world: World, destination: str | None) -> Path:
    """The run folder (same on every rank); refuses to mix with an earlier run unless asked."""
    if config.output_dir:
        path = Path(config.output_dir)
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        path = Path("runs") / f"{(destination or 'adapter').replace('/', '--')}-{stamp}"
    path = Path(broadcast_from_main(str(path.resolve()), world))
    earlier = path.is_dir() and ((path / LOG_FILE).exists() or any(path.glob(f"{PREFIX}*")))
    if earlier and not (config.resume_from_checkpoint or config.overwrite_output_dir):
        raise ConfigError(
            f"output_dir: {path} already holds a run; set resume_from_checkpoint: latest to "
            "continue it, overwrite_output_dir: true to replace it, or choose another output_dir"
        )
    if world.is_main:
        if earlier and config.overwrite_output_dir and not config.resume_from_checkpoint:
            for old in [*path.glob(f"{PREFIX}*"), path / ADAPTER_SUBDIR]:
                shutil.rmtree(old, ignore_errors=True)
            for name in outputs.RUN_FILES:
                (path / name).unlink(missing_ok=True)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_FILE).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return path


def _log_settings(config: TrainConfig, device: torch.device, world: World) -> None:
    """One warning for LLaMA-Factory keys that have no effect; a note when bf16/fp16 cannot apply."""
    if not world.is_main:
        return
    warning = ignored_warning(config.ignored)
    if warning:
        log.warning("warning: %s", warning)
    note = pick_precision(config.bf16, config.fp16, device).note
    if note:
        log.warning("note: %s", note)


def _log_data(data: LoadedDatasets, train: TokenizedSplit, val: TokenizedSplit,
              config: TrainConfig, world: World) -> None:
    if not world.is_main:
        return
    log.info(
        "data: %d records (%d duplicates dropped), %d train / %d eval examples, %d cut to "
        "cutoff_len %d, %d dropped with no answer left, digest %s",
        len(data.conversations), data.duplicates_dropped, len(train.examples), len(val.examples),
        train.truncated + val.truncated, config.cutoff_len,
        train.dropped_no_target + val.dropped_no_target, data.digest[:12],
    )


def _dataset_record(run: Run) -> dict:
    return {
        **run.data.summary(),
        **({"eval": run.eval_data.summary()} if run.eval_data else {}),
        "train_examples": len(run.train.examples),
        "eval_examples": len(run.val.examples),
        "truncated": run.train.truncated + run.val.truncated,
        "dropped_no_target": run.train.dropped_no_target + run.val.dropped_no_target,
        "cutoff_len": run.config.cutoff_len,
    }


def _metrics(run: Run, result: FitResult) -> dict:
    per_epoch = steps_per_epoch(len(run.train.examples), run.world, run.settings)
    return {
        "initial_loss": result.state.first_loss,
        # Mean over the last logging window: the loss the adapter ends with, smoothed.
        "train_loss": sum(result.last_losses) / len(result.last_losses) if result.last_losses else None,
        "eval_loss": result.eval_loss,
        "tokens_seen": result.state.tokens_seen,
        "wall_time_s": round(result.wall_time_s, 3),
        "steps": result.state.step,
        "epochs": round(result.state.step / per_epoch, 3),
        "world_size": run.world.size,
        "device": run.device.type,
        "quantization_bit": run.config.quantization_bit,
    }


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"
