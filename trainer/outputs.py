"""The files a finished run leaves in output_dir, laid out as LLaMA-Factory leaves them.

Beside loradock's own `train_config.yaml`, `train_log.jsonl`, checkpoints and `adapter/`:

    adapter_config.json, adapter_model.safetensors   the final adapter at the top, as
                                                     `llamafactory-cli train` saves it (hard
                                                     links to adapter/, so no extra space)
    train_results.json, eval_results.json, all_results.json
                                                     the run's metrics under transformers' names
    training_loss.png, training_eval_loss.png        with plot_loss: the loss curves (raw and
                                                     smoothed, LLaMA-Factory's smoothing)
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

LINKED_FILES = ("adapter_config.json", "adapter_model.safetensors")
RESULT_FILES = ("train_results.json", "eval_results.json", "all_results.json")
PLOT_FILES = ("training_loss.png", "training_eval_loss.png")
RUN_FILES = (*LINKED_FILES, *RESULT_FILES, *PLOT_FILES)  # what overwrite_output_dir removes


def link_adapter(adapter_dir: Path, output_dir: Path) -> None:
    """Put the adapter's PEFT files at the top of output_dir (hard links, else copies)."""
    for name in LINKED_FILES:
        target = output_dir / name
        target.unlink(missing_ok=True)
        try:
            os.link(adapter_dir / name, target)
        except OSError:
            shutil.copy2(adapter_dir / name, target)


def read_log(log_path: Path) -> list[dict]:
    if not log_path.exists():
        return []
    return [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]


CURVE_POINTS = 500  # per series kept in the manifest: enough to draw, a few KB at most


def loss_curve(records: list[dict], max_points: int = CURVE_POINTS) -> dict[str, list[list[float]]]:
    """The run's loss and eval loss by step as `{"loss": [[step, value], ...], "eval_loss": ...}`,
    each thinned evenly to at most `max_points` (the last point always kept), for the manifest's
    metrics (the console draws it). Non-finite values (a step whose loss overflowed) are left
    out: a manifest is plain JSON."""
    curve = {}
    for key in ("loss", "eval_loss"):
        points = [[r["step"], r[key]] for r in records if r.get(key) is not None and math.isfinite(r[key])]
        if len(points) > max_points:
            stride = math.ceil(len(points) / max_points)
            kept = points[::stride][: max_points - 1]
            points = kept if kept[-1] is points[-1] else [*kept, points[-1]]
        if points:
            curve[key] = points
    return curve


def write_results(output_dir: Path, records: list[dict], *, epoch: float, runtime_s: float,
                  eval_loss: float | None) -> dict:
    """train_results.json (+ eval_results.json) and all_results.json; returns all results.

    train_loss is transformers' meaning: the mean loss over every step of the run.
    """
    losses = [r["loss"] for r in records if "loss" in r]
    train = {
        "epoch": epoch,
        "train_loss": sum(losses) / len(losses) if losses else None,
        "train_runtime": round(runtime_s, 4),
        "train_steps_per_second": round(len(losses) / runtime_s, 3) if runtime_s > 0 else None,
    }
    results = dict(train)
    _write_json(output_dir / "train_results.json", train)
    if eval_loss is not None:
        evaluation = {"epoch": epoch, "eval_loss": eval_loss}
        results.update(evaluation)
        _write_json(output_dir / "eval_results.json", evaluation)
    _write_json(output_dir / "all_results.json", results)
    return results


def plot_losses(output_dir: Path, records: list[dict]) -> list[Path]:
    """training_loss.png, and training_eval_loss.png when eval losses were logged."""
    written = []
    for key in ("loss", "eval_loss"):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if not points:
            continue
        path = output_dir / f"training_{key}.png"
        _plot(points, key, f"training {key} of {output_dir}", path)
        written.append(path)
    return written


def smooth(values: list[float]) -> list[float]:
    """LLaMA-Factory's (TensorBoard-style) EMA, its weight rising with the number of points."""
    if not values:
        return []
    weight = 1.8 * (1 / (1 + math.exp(-0.05 * len(values))) - 0.5)
    out, last = [], values[0]
    for value in values:
        last = last * weight + (1 - weight) * value
        out.append(last)
    return out


def _plot(points: list[tuple[int, float]], key: str, title: str, path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    steps, values = zip(*points, strict=True)
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    ax.plot(steps, values, color="#1f77b4", alpha=0.4, label="original")
    ax.plot(steps, smooth(list(values)), color="#1f77b4", label="smoothed")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.legend()
    fig.savefig(path, format="png", dpi=100)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
