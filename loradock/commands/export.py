"""`loradock export`: a registry version as a clean PEFT directory or a merged full model."""

from __future__ import annotations

import argparse
import sys

from loradock.commands.common import registry_from
from loradock.errors import UserError

REF_HELP = "adapter reference: NAME (latest), NAME@N (version N) or NAME@ALIAS"


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "export", help="export a version as a PEFT directory or a merged Hugging Face model",
        description="Write the version REF names into DIR (which must not exist or be empty; "
        "nothing is left behind on failure). Without --merge: a clean PEFT adapter directory "
        "(adapter_config.json, adapter_model.safetensors, model card; no manifest). With --merge: "
        "a full Hugging Face model directory, the adapter merged into an unquantized copy of its "
        "registry base, with the tokenizer and a model card; an adapter trained on a 4-bit base "
        "(QLoRA) is merged into that base dequantized, and the card says so.",
    )
    parser.add_argument("ref", metavar="REF", help=REF_HELP)
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (new or empty)")
    parser.add_argument("--merge", action="store_true",
                        help="merge the adapter into its base and write a full model")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"),
                        help="dtype of the merged model's weights (--merge only; default: the dtype the "
                        "base is stored in)")
    parser.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from loradock.trainer.export import ExportError, ExportSource, export_version

    registry = registry_from(args)
    version = registry.resolve(args.ref)
    base_name = (version.manifest.get("base") or {}).get("name")
    base_dir = registry.base(base_name).path if base_name and registry.has_base(base_name) else None
    source = ExportSource(version.ref, version.digest, version.path, version.manifest, base_name, base_dir)
    try:
        out = export_version(source, args.out, merge=args.merge, dtype=args.dtype,
                             progress=lambda line: print(line, file=sys.stderr, flush=True))
    except ExportError as e:
        raise UserError(str(e)) from e
    print(out)
    return 0
