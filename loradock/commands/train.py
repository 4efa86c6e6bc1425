"""`loradock train CONFIG.yaml [key=value ...]`: fine-tune a LoRA adapter and publish it."""

from __future__ import annotations

import argparse
import os

from loradock.commands.common import print_json, registry_from
from loradock.errors import UserError

DESCRIPTION = """\
Train a LoRA adapter from a YAML config and a dataset, and publish it as the next
version of adapter_name (default: the config file's name) in the registry (printed
as name@N). Key names follow LLaMA-Factory, so its SFT LoRA and QLoRA configs run as
they are, from the folder holding its data/: its keys with no effect here are named
in one warning, deepspeed is refused (use torchrun), and a template name is accepted
when it renders as the base's own chat template (docs/llamafactory.md). key=value
arguments override the file (values are read as YAML: lora_rank=16, dataset=a,b,
publish=false).

Datasets: alpaca (instruction/input/output, optional system and history) or
sharegpt (conversations with from/value, or OpenAI-style messages with
role/content), as JSON lists or JSONL, by file name or by their name in
dataset_dir/dataset_info.json. The loss covers assistant tokens only.

Data parallel: run the same command under `torchrun --nproc_per_node N` or
`accelerate launch`; rank 0 publishes once.

Config keys:
"""


def register(sub: argparse._SubParsersAction) -> None:
    from loradock.trainer.config import config_help

    parser = sub.add_parser(
        "train",
        help="fine-tune a LoRA adapter from a YAML config and publish it",
        description=DESCRIPTION + config_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="training config (YAML)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config values that win over the file")
    parser.add_argument("--json", action="store_true", help="print the new version's manifest as JSON")
    parser.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from loradock.trainer import TrainerError, train  # torch import only when training

    try:
        version = train(args.config, args.overrides, registry=registry_from(args))
    except TrainerError as e:
        raise UserError(str(e)) from e
    if version is None or os.environ.get("RANK", "0") != "0":
        return 0  # not published, or not the process that reports it
    if args.json:
        print_json({"ref": version.ref, "path": str(version.path), **version.manifest})
    else:
        print(version.ref)
    return 0
