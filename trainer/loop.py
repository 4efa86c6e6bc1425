"""The optimisation loop: batches, one optimizer step, eval loss, the step log.

Kept free of setup and publishing so it reads top to bottom: for each step,
run `gradient_accumulation_steps` micro-batches, average the loss over the
assistant tokens of the whole step, clip, step the optimizer and scheduler.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from .checkpoint import TrainState, save_checkpoint
from .distributed import World, all_reduce_sum
from .templates import IGNORE_INDEX, Example

LOG_FILE = "train_log.jsonl"


@dataclass
class LoopSettings:
    batch_size: int
    eval_batch_size: int
    accumulation: int
    total_steps: int
    max_grad_norm: float
    logging_steps: int
    eval_steps: int | None
    save_steps: int
    seed: int
    autocast_dtype: torch.dtype | None
    eval_each_epoch: bool = False  # eval_strategy: epoch
    model_only_checkpoints: bool = False  # save_only_model


def collate(examples: list[Example], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch: input_ids, attention_mask, labels  # each [batch, longest]."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def epoch_steps(n_examples: int, world: World, s: LoopSettings, epoch: int) -> list[list[list[int]]]:
    """This rank's example indices for `epoch`: steps -> micro-batches -> indices (seeded order)."""
    sampler = DistributedSampler(
        range(n_examples), num_replicas=world.size, rank=world.rank, shuffle=True, seed=s.seed
    )
    sampler.set_epoch(epoch)
    order = list(sampler)
    micro = [order[i : i + s.batch_size] for i in range(0, len(order), s.batch_size)]
    return [micro[i : i + s.accumulation] for i in range(0, len(micro), s.accumulation)]


def steps_per_epoch(n_examples: int, world: World, s: LoopSettings) -> int:
    per_rank = math.ceil(n_examples / world.size)
    return math.ceil(math.ceil(per_rank / s.batch_size) / s.accumulation)


def token_loss_sum(model, batch: dict[str, torch.Tensor], autocast_dtype: torch.dtype | None) -> torch.Tensor:
    """Summed next-token cross-entropy over the labelled (assistant) tokens of a micro-batch."""
    device_type = batch["input_ids"].device.type
    ctx = torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with ctx:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        batch["labels"][:, 1:].flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def labelled_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


class StepLog:
    """One JSON line per step (and per eval) in output_dir/train_log.jsonl, also handed to `sinks`."""

    def __init__(self, output_dir: Path, resume_step: int, enabled: bool,
                 sinks: Sequence[Callable[[dict], None]] = ()) -> None:
        self.path = output_dir / LOG_FILE
        self.enabled = enabled
        self.sinks = list(sinks) if enabled else []
        if enabled and resume_step and self.path.exists():
            # Lines past the checkpoint belong to the interrupted attempt; the resumed run rewrites them.
            kept = [ln for ln in self.path.read_text().splitlines() if json.loads(ln)["step"] <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        elif enabled:
            self.path.write_text("")

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        for sink in self.sinks:
            sink(record)


def evaluate(model, examples: list[Example], world: World, s: LoopSettings, pad_id: int, device) -> float | None:
    """Token-averaged loss on the validation split (sharded over ranks, no padding duplicates)."""
    if not examples:
        return None
    mine = examples[world.rank :: world.size]
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(mine), s.eval_batch_size):
            batch = collate(mine[i : i + s.eval_batch_size], pad_id, device)
            total += float(token_loss_sum(model, batch, s.autocast_dtype))
            count += labelled_tokens(batch)
    model.train()
    total, count = all_reduce_sum([total, count], world, device)
    return total / count if count else None


@dataclass
class FitResult:
    state: TrainState
    last_losses: list[float]
    eval_loss: float | None
    wall_time_s: float


def fit(
    model, inner_model, optimizer, scheduler, train: list[Example], val: list[Example], *,
    state: TrainState, settings: LoopSettings, world: World, device: torch.device, pad_id: int,
    output_dir: Path, checkpoint_meta: dict, sinks: Sequence[Callable[[dict], None]] = (),
) -> FitResult:
    """Train until `settings.total_steps`, starting from `state` (0 or a checkpoint).

    `model` is what forward/backward run through (DDP-wrapped when distributed);
    `inner_model` is the PeftModel itself, for eval and saving; `sinks` get every
    step-log record too (rank 0), e.g. a TensorBoard writer.
    """
    s = settings
    params = [p for p in inner_model.parameters() if p.requires_grad]
    log = StepLog(output_dir, state.step, world.is_main, sinks)
    recent: deque[float] = deque(maxlen=s.logging_steps)  # losses of the last logging window
    started = time.monotonic()
    model.train()
    bar = tqdm(total=s.total_steps, initial=state.step, desc="training", unit="step", disable=not world.is_main)
    while state.step < s.total_steps:
        steps = epoch_steps(len(train), world, s, state.epoch)
        for group in steps[state.batches_in_epoch // s.accumulation :]:
            loss, tokens, grad_norm = _optimizer_step(
                model, optimizer, scheduler, params, group, train, s, world, device, pad_id
            )
            state.step += 1
            state.batches_in_epoch += len(group)
            state.tokens_seen += tokens
            state.first_loss = loss if state.first_loss is None else state.first_loss
            recent.append(loss)
            lr = scheduler.get_last_lr()[0]
            log.write({"step": state.step, "epoch": state.epoch, "loss": loss, "lr": lr,
                       "grad_norm": grad_norm, "tokens_seen": state.tokens_seen,
                       "elapsed_s": round(time.monotonic() - started, 3)})
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            if state.step % s.logging_steps == 0 and world.is_main:
                mean = sum(recent) / len(recent)
                bar.write(f"step {state.step}/{s.total_steps}  loss {mean:.4f}  lr {lr:.2e}", file=sys.stderr)
            if s.eval_steps and state.step % s.eval_steps == 0 and state.step < s.total_steps:
                log.write({"step": state.step, "eval_loss": evaluate(inner_model, val, world, s, pad_id, device)})
            if s.save_steps and state.step % s.save_steps == 0:
                save_checkpoint(output_dir, inner_model, optimizer, scheduler, state,
                                rank=world.rank, world_size=world.size,
                                model_only=s.model_only_checkpoints, **checkpoint_meta)
            if state.step >= s.total_steps:
                break
        else:
            state.epoch += 1
            state.batches_in_epoch = 0
            if s.eval_each_epoch and state.step < s.total_steps:
                log.write({"step": state.step, "eval_loss": evaluate(inner_model, val, world, s, pad_id, device)})
    bar.close()
    eval_loss = evaluate(inner_model, val, world, s, pad_id, device)
    if eval_loss is not None:
        log.write({"step": state.step, "eval_loss": eval_loss})
    return FitResult(state, list(recent), eval_loss, time.monotonic() - started)


def _optimizer_step(
    model, optimizer, scheduler, params, group: list[list[int]], train: list[Example],
    s: LoopSettings, world: World, device, pad_id: int,
) -> tuple[float, int, float]:
    """One optimizer step over a group of micro-batches; returns (loss, tokens, grad norm), global."""
    batches = [collate([train[i] for i in idx], pad_id, device) for idx in group]
    n_labelled = max(1, sum(labelled_tokens(b) for b in batches))
    loss_total = 0.0
    for i, batch in enumerate(batches):
        # Gradients are only averaged across processes on the last micro-batch of the step.
        last = i == len(batches) - 1
        sync = contextlib.nullcontext() if last or world.size == 1 else model.no_sync()
        with sync:
            loss_sum = token_loss_sum(model, batch, s.autocast_dtype)
            (loss_sum / n_labelled).backward()
        loss_total += float(loss_sum.detach())
    max_norm = s.max_grad_norm if s.max_grad_norm > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    loss_total, n_all, tokens = all_reduce_sum([loss_total, n_labelled, tokens], world, device)
    return loss_total / n_all, int(tokens), grad_norm
