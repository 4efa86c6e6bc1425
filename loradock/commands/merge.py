"""`loradock adapters merge`: combine registry versions into a new version (PEFT's
`add_weighted_adapter` semantics), published with its lineage."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from loradock.commands.common import print_json, registry_from
from loradock.commands.signing import add_sign_key_argument
from loradock.errors import UserError
from loradock.registry import AdapterVersion, Registry

STRATEGY_HELP = (
    "{linear,cat,svd,ties,dare_linear,dare_ties} (default: linear). linear: weighted sum of the A and of the B matrices (equal ranks); cat: A and B "
    "concatenated, exact (rank = sum of ranks); svd: weighted sum of the full deltas, truncated "
    "SVD to the largest rank; ties / dare_linear / dare_ties: task-arithmetic merges that prune "
    "to --density first (equal ranks)"
)


def add_merge_parser(actions: argparse._SubParsersAction) -> None:
    # Choices are checked by MergeRecipe (importing the runtime here would load torch for --help).
    merge = actions.add_parser(
        "merge", help="merge versions into a new version (linear, cat, svd, ties, dare_*)",
        description="Combine adapter versions of one base into a new version of NAME, with the "
        "semantics of PEFT's add_weighted_adapter. The manifest records the lineage: `parents` "
        "(each input as NAME@N with its digest and weight) and `source` (strategy, density, "
        "majority_sign_method, seed). Incompatible inputs (different bases, different ranks "
        "where the strategy needs equal ones, DoRA or bias adapters) are refused and nothing is "
        "published. Prints the new NAME@N.",
    )
    merge.add_argument("refs", nargs="+", metavar="REF",
                       help="adapters to merge: NAME, NAME@N or NAME@ALIAS (resolved to versions now)")
    merge.add_argument("--weights", required=True, metavar="W1,W2,...",
                       help="one weight > 0 per REF, comma-separated, e.g. 0.7,0.3")
    merge.add_argument("--strategy", default="linear", help=STRATEGY_HELP)
    merge.add_argument("--density", type=float, metavar="D",
                       help="fraction of values kept, in (0, 1]; required by ties, dare_linear and "
                       "dare_ties, refused by the others")
    merge.add_argument("--majority-sign-method", default="total", metavar="{total,frequency}",
                       help="how ties and dare_ties elect each value's sign: by total magnitude or "
                       "by count (default: total)")
    merge.add_argument("--seed", type=int, default=0,
                       help="seed of DARE's random pruning, recorded in the manifest (default: 0)")
    merge.add_argument("--name", required=True, help="adapter name of the result, optionally ORG/NAME")
    merge.add_argument("--alias", action="append", default=[], metavar="ALIAS",
                       help="point ALIAS at the new version (repeatable)")
    merge.add_argument("--json", action="store_true", help="print the new version's manifest as JSON")
    add_sign_key_argument(merge)
    merge.set_defaults(func=cmd_merge)


def parse_weights(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(w) for w in text.split(","))
    except ValueError as e:
        raise UserError(f"--weights {text!r}: expected comma-separated numbers such as 0.7,0.3") from e


def merge_versions(registry: Registry, refs: list[str], recipe, name: str,
                   aliases: list[str] = (), sign_key: Path | None = None) -> AdapterVersion:
    """Resolve `refs`, merge them with `recipe` and publish the result as the next version of
    `name`, signed with `sign_key` if given (nothing is published when any step fails)."""
    from loradock.runtime.adapter_merge import (
        MergeError,
        merge_adapters,
        module_order,
        read_peft_dir,
        write_peft_dir,
    )

    versions = [registry.resolve(ref) for ref in refs]  # NotFoundError lists what exists
    fingerprints = [(v.manifest.get("base") or {}).get("fingerprint") for v in versions]
    base_names = {(v.manifest.get("base") or {}).get("name") for v in versions}
    try:
        inputs = [read_peft_dir(v.ref, v.path, fp) for v, fp in zip(versions, fingerprints, strict=True)]
        base_name = next(iter(base_names)) if len(base_names) == 1 else None
        order = None
        if base_name and registry.has_base(base_name):
            order = module_order(registry.base(base_name).path)
        print(f"merging {', '.join(v.ref for v in versions)} ({recipe.strategy}) ...", file=sys.stderr)
        config, tensors = merge_adapters(inputs, recipe, module_order=order)
    except MergeError as e:
        raise UserError(str(e)) from e
    parents = [{"ref": v.ref, "digest": v.digest, "weight": w}
               for v, w in zip(versions, recipe.weights, strict=True)]
    with tempfile.TemporaryDirectory(prefix="loradock-merge-") as tmp:
        write_peft_dir(config, tensors, Path(tmp))
        return registry.publish(tmp, name, base=base_name, aliases=aliases, sign_key=sign_key,
                                metadata={"source": {"kind": "merge", **recipe.as_json()}, "parents": parents})


def cmd_merge(args: argparse.Namespace) -> int:
    from loradock.commands.adapters import version_json
    from loradock.runtime.adapter_merge import MergeRecipe

    recipe = MergeRecipe(parse_weights(args.weights), args.strategy, args.density,
                         args.majority_sign_method, args.seed)
    problems = recipe.problems(len(args.refs))
    if problems:
        raise UserError("cannot merge: " + "; ".join(problems))
    registry = registry_from(args)
    version = merge_versions(registry, args.refs, recipe, args.name, args.alias, args.sign_key)
    if args.json:
        print_json(version_json(registry, version))
    else:
        print(version.ref)
    return 0
