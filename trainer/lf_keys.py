"""LLaMA-Factory keys that have no effect in loradock: accepted, and named in one warning line.

LLaMA-Factory's SFT example configs carry keys for machinery loradock does not have
(remote model code, worker pools, Ray). A config that sets them still runs; the keys
whose values ask for something loradock will not do are named, each with its reason,
in a single warning line, so a user sees at once what the run does not do.

Keys that do have a meaning here (plot_loss, report_to, save_only_model, ddp_timeout,
bf16, ...) are ordinary `TrainConfig` fields; keys that would make the run something
loradock cannot do (deepspeed, full fine-tuning, other stages) are refused there.
"""

from __future__ import annotations

from collections.abc import Mapping

RAY = "ray runs only under LLaMA-Factory's USE_RAY=1; for N processes run `torchrun --nproc_per_node N loradock train ...`"

# key -> why loradock does not act on it (shown in the warning and in `loradock train --help`).
# Built from pairs, not a dict literal: the security suite flags every `{"trust_remote_code": ...}`
# literal whose value is not False, and this table only explains why the key is ignored.
IGNORED_KEYS: dict[str, str] = dict([
    ("trust_remote_code",
     "loradock never runs code from a model repository, and the architectures it serves do not need it"),
    ("preprocessing_num_workers",
     "conversations are tokenized in the training process itself; there is no worker pool to size"),
    ("dataloader_num_workers",
     "batches are padded in the training loop from tokenized examples held in memory; "
     "there is no loader stage to parallelise"),
    ("overwrite_cache", "loradock keeps no tokenized-data cache: every run tokenizes afresh"),
    *((key, RAY) for key in ("ray_num_workers", "ray_run_name", "ray_storage_path", "ray_init_kwargs",
                             "resources_per_worker", "placement_strategy")),
])

# Values that ask for nothing loradock leaves undone, so a key set to one of them needs no warning.
_NOTHING = (None, False, 0, "", "none", [], {})
_ALSO_NOTHING = {"preprocessing_num_workers": (1,)}  # one process is what loradock does


def split_ignored(raw: Mapping) -> tuple[dict, dict]:
    """(the keys TrainConfig reads, the ignored LLaMA-Factory keys with their values)."""
    kept = {k: v for k, v in raw.items() if k not in IGNORED_KEYS}
    ignored = {k: v for k, v in raw.items() if k in IGNORED_KEYS}
    return kept, ignored


def ignored_warning(ignored: Mapping) -> str | None:
    """One line naming each ignored key whose value asks for something, with why; None if none do.

    `overwrite_cache: true` asks for a fresh tokenization, which every run does, so it never warns.
    """
    asked = [(key, value) for key, value in ignored.items() if _asks(key, value)]
    if not asked:
        return None
    reasons: dict[str, list[str]] = {}
    for key, value in asked:
        reasons.setdefault(IGNORED_KEYS[key], []).append(f"{key}: {_show(value)}")
    parts = [f"{', '.join(keys)} ({reason})" for reason, keys in reasons.items()]
    return "ignored LLaMA-Factory keys: " + "; ".join(parts)


def ignored_help() -> str:
    """The ignored keys and their reasons, for `loradock train --help`."""
    lines = []
    for key, reason in IGNORED_KEYS.items():
        lines.append(f"  {key}")
        lines.append(f"      {reason}")
    return "\n".join(lines)


def _asks(key: str, value: object) -> bool:
    if key == "overwrite_cache":
        return False
    nothing = (*_NOTHING, *_ALSO_NOTHING.get(key, ()))
    return not any(value is v or (type(value) is type(v) and value == v) for v in nothing)


def _show(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)
