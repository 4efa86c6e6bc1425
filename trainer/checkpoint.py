"""Resumable checkpoints: adapter + optimizer + scheduler + RNG + position in the data.

A checkpoint is `output_dir/checkpoint-<step>/`, written to a temporary folder
and renamed into place, so an interrupted save never looks complete. Resuming
restores everything the next step depends on, so a resumed run ends with the
same weights as one that was never stopped. With `save_only_model` a checkpoint
holds the adapter and the loop state only; it is refused as a place to resume from.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .config import TrainConfig
from .errors import CheckpointError
from .model import ADAPTER_WEIGHTS, load_adapter_weights

STATE_FILE = "trainer_state.json"
PREFIX = "checkpoint-"

# Config keys that shape the trajectory: a checkpoint only continues a run that agrees on them.
MUST_MATCH = (
    "model_name_or_path", "quantization_bit", "dataset", "cutoff_len", "max_samples", "val_size",
    "lora_rank", "lora_alpha", "lora_dropout", "lora_target", "use_rslora", "use_dora",
    "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "weight_decay",
    "num_train_epochs", "max_steps", "max_grad_norm", "lr_scheduler_type", "warmup_ratio",
    "warmup_steps", "seed", "parent", "double_quantization",
)


@dataclass
class TrainState:
    """Where the loop is: optimizer steps done, epoch, micro-batches used in that epoch, tokens."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    tokens_seen: int = 0
    first_loss: float | None = None


def save_checkpoint(
    output_dir: Path, model, optimizer, scheduler, state: TrainState, *,
    config: dict, dataset_digest: str, rank: int = 0, world_size: int = 1, model_only: bool = False,
) -> Path:
    """Write checkpoint-<step> (rank 0 writes the shared parts; every rank its RNG state).

    `model_only` (save_only_model) leaves out optimizer, scheduler and RNG states.
    """
    final = output_dir / f"{PREFIX}{state.step}"
    staging = output_dir / f".{PREFIX}{state.step}.tmp"
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        model.save_pretrained(staging)
        if not model_only:
            torch.save(optimizer.state_dict(), staging / "optimizer.pt")
            torch.save(scheduler.state_dict(), staging / "scheduler.pt")
        meta = {"state": asdict(state), "config": config, "dataset_digest": dataset_digest,
                "world_size": world_size, "model_only": model_only}
        (staging / STATE_FILE).write_text(json.dumps(meta, indent=2))
    _barrier(world_size)
    if not model_only:
        torch.save(_rng_state(), staging / f"rng_rank{rank}.pt")
    _barrier(world_size)
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
    _barrier(world_size)
    return final


def find_checkpoint(spec: str, output_dir: Path) -> Path:
    """A checkpoint folder from `resume_from_checkpoint`: a path, or true/latest = newest in output_dir."""
    if spec.lower() in ("true", "latest"):
        found = sorted(
            (p for p in output_dir.glob(f"{PREFIX}*") if (p / STATE_FILE).is_file()),
            key=lambda p: int(p.name[len(PREFIX):]),
        )
        if not found:
            raise CheckpointError(f"resume_from_checkpoint: no checkpoints in {output_dir}")
        return found[-1]
    path = Path(spec)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"resume_from_checkpoint: {path} is not a checkpoint (no {STATE_FILE})")
    return path


def load_checkpoint(
    path: Path, model, optimizer, scheduler, *, config: dict, dataset_digest: str,
    rank: int = 0, world_size: int = 1,
) -> TrainState:
    """Restore a checkpoint into model, optimizer, scheduler and RNG; return the loop state."""
    meta = json.loads((path / STATE_FILE).read_text())
    if meta.get("model_only"):
        raise CheckpointError(
            f"resume_from_checkpoint: {path} was saved with save_only_model: true, so it holds the "
            "adapter weights but no optimizer, scheduler or RNG state, and the run cannot continue "
            "exactly from it; use a run saved with save_only_model: false (or start afresh with "
            "parent set to a published version)"
        )
    # A key the checkpoint's config lacks was added later; it held its default then.
    defaults = _field_defaults()
    differs = [k for k in MUST_MATCH if meta["config"].get(k, defaults.get(k)) != config.get(k)]
    if differs:
        detail = ", ".join(f"{k}: {meta['config'].get(k)!r} -> {config.get(k)!r}" for k in differs)
        raise CheckpointError(f"resume_from_checkpoint: {path} was made with a different config ({detail})")
    if meta["dataset_digest"] != dataset_digest:
        raise CheckpointError(f"resume_from_checkpoint: {path} was made on different data (dataset digest differs)")
    if meta["world_size"] != world_size:
        raise CheckpointError(
            f"resume_from_checkpoint: {path} was made with {meta['world_size']} processes, "
            f"this run has {world_size}; the data order would differ"
        )
    load_adapter_weights(model, path / ADAPTER_WEIGHTS, "checkpoint")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    _set_rng_state(torch.load(path / f"rng_rank{rank}.pt", weights_only=True))
    return TrainState(**meta["state"])


def _field_defaults() -> dict:
    return {f.name: f.default for f in dataclasses.fields(TrainConfig)
            if f.default is not dataclasses.MISSING}


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier(world_size: int) -> None:
    if world_size > 1:
        torch.distributed.barrier()
