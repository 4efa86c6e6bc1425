"""`report_to`: where step metrics go besides train_log.jsonl (which always gets them).

`tensorboard` writes event files under output_dir/runs with the tags transformers'
TensorBoard callback uses (train/loss, train/learning_rate, train/grad_norm,
eval/loss), so LLaMA-Factory users' dashboards read them the same way. It needs the
`tensorboard` package, which loradock does not install; asking for it without the
package is an error before anything is trained.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

from .errors import ConfigError

TENSORBOARD_DIR = "runs"
TAGS = {"loss": "train/loss", "lr": "train/learning_rate", "grad_norm": "train/grad_norm",
        "eval_loss": "eval/loss"}


def check_reporters(names: Sequence[str]) -> None:
    """Raise ConfigError, before training, for a destination whose package is missing."""
    if "tensorboard" in names and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "report_to: tensorboard needs the tensorboard package, which is not installed; "
            "install it with `pip install tensorboard` (or set report_to: none; every step is "
            "in train_log.jsonl either way)"
        )


class TensorBoardSink:
    """Step-log records -> TensorBoard scalars, at the record's step."""

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def __call__(self, record: dict) -> None:
        for key, tag in TAGS.items():
            value = record.get(key)
            if value is not None:
                self.writer.add_scalar(tag, value, record["step"])

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def open_sinks(names: Sequence[str], output_dir: Path) -> list[TensorBoardSink]:
    """The sinks for `report_to` (call on rank 0 only; close them when the run ends)."""
    check_reporters(names)
    return [TensorBoardSink(output_dir / TENSORBOARD_DIR)] if "tensorboard" in names else []
