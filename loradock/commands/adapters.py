"""`loradock adapters ...`: publish, inspect, alias, verify and move adapter versions."""

from __future__ import annotations

import argparse
import dataclasses
import urllib.error
import urllib.request
from pathlib import Path

from loradock.commands.common import print_json, print_table, registry_from
from loradock.commands.merge import add_merge_parser
from loradock.commands.signing import add_sign_key_argument, add_sign_parser
from loradock.errors import UserError
from loradock.registry import METRICS, AdapterVersion, EvalRecord, Registry
from loradock.registry.quantization import QuantizationRecipe, recorded_recipe
from loradock.registry.trust import TrustPolicy
from loradock.tables import clip

REF_HELP = "adapter reference: NAME (latest), NAME@N (version N) or NAME@ALIAS"


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "adapters",
        help="publish, list, alias, verify, pull and push LoRA adapters",
        description="Adapters are immutable, digest-verified versions under "
        "$LORADOCK_HOME/adapters/<name>/versions/<N>/, each a PEFT adapter directory with a "
        "manifest.json and a model card. Refer to them as NAME, NAME@N or NAME@ALIAS.",
    )
    actions = parser.add_subparsers(dest="adapters_command", metavar="ACTION", required=True)

    lst = actions.add_parser("list", help="list adapters (latest version of each)",
                             description="List every adapter with its latest version and aliases.")
    lst.add_argument("--json", action="store_true", help="print JSON instead of a table")
    lst.set_defaults(func=cmd_list)

    show = actions.add_parser("show", help="show one version's manifest",
                              description="Show a version: name, version, digest, path, aliases "
                              "and its manifest, with the quantization recipe it was trained on "
                              "(and how `loradock serve`'s default differs). Files are checked "
                              "against the manifest first.")
    show.add_argument("ref", help=REF_HELP)
    show.add_argument("--json", action="store_true", help="print JSON instead of text")
    show.set_defaults(func=cmd_show)

    pub = actions.add_parser(
        "publish", help="store a PEFT LoRA adapter directory as a new version",
        description="Validate a PEFT LoRA adapter directory (adapter_config.json + "
        "adapter_model.safetensors) and store it as the next version of NAME. Prints NAME@N.",
    )
    pub.add_argument("dir", help="directory written by PEFT's save_pretrained")
    pub.add_argument("--name", required=True, help="adapter name, optionally ORG/NAME")
    pub.add_argument("--base", help="registry base (name or model directory) the adapter was trained on (checked against "
                     "its layer shapes; default: the base named in adapter_config.json)")
    pub.add_argument("--alias", action="append", default=[], metavar="ALIAS",
                     help="point ALIAS at the new version (repeatable)")
    pub.add_argument("--json", action="store_true", help="print the new version as JSON")
    add_sign_key_argument(pub)
    pub.set_defaults(func=cmd_publish)

    tag = actions.add_parser("tag", help="point an alias at a version",
                             description="Point ALIAS at the version REF means (moving it if it exists).")
    tag.add_argument("ref", help=REF_HELP)
    tag.add_argument("alias", help="alias name (starts with a letter)")
    tag.add_argument("--weight", type=int, default=100, metavar="PERCENT",
                     help="send only this percentage of the alias's traffic to REF (a canary), the rest to "
                          "its stable version; requests with the same route key stay on one version "
                          "(default: 100, all of it)")
    tag.add_argument("--reason", default="", help="why, for the alias's history")
    tag.add_argument("--require", action="append", default=[], metavar="METRIC OP VALUE",
                     help="refuse the move unless REF's newest evaluation of METRIC (see `adapters eval`) meets "
                          "this, e.g. 'contains>=0.8' or 'rouge-l>base' (base: the base model's score in that "
                          "evaluation); OP one of >= > <= < ==; repeatable")
    tag.set_defaults(func=cmd_tag)

    evaluate = actions.add_parser(
        "eval", help="score a version on held-out questions and record it",
        description="Answer every question of a held-out file (JSON Lines: one {\"question\": ..., "
                    "\"expected\": ...} per line) with the version REF means, greedy, in one batch of an "
                    "in-process engine on its base (served as `loradock serve` serves it), score the answers and "
                    "keep the result beside the version (append-only: metric, score, base score, dataset name "
                    "and sha256, examples, settings, time, who). `adapters show` and the HTTP server's "
                    "/v1/models report it; `adapters tag --require` gates alias moves on it.")
    evaluate.add_argument("ref", help=REF_HELP)
    evaluate.add_argument("--data", type=Path, required=True, metavar="FILE", help="held-out questions (JSON Lines)")
    evaluate.add_argument("--metric", choices=METRICS, default="contains",
                          help="exact: the whole answer equals the expected one; contains: the answer states it "
                               "(case, spaces and thousands separators ignored); regex: expected is a Python "
                               "regular expression found in the answer; rouge-l: longest-common-subsequence F1 "
                               "of the words (default: contains)")
    evaluate.add_argument("--base-compare", action="store_true",
                          help="also answer with the base model alone and record its score")
    evaluate.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                          help="tokens per answer (default: 64)")
    evaluate.add_argument("--quantize", choices=("nf4", "int8", "none"), default="nf4",
                          help="the base's quantization, as for `loradock serve` (default: nf4)")
    evaluate.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to run")
    evaluate.add_argument("--json", action="store_true", help="print the record and every answer as JSON")
    evaluate.set_defaults(func=cmd_eval)

    canary = actions.add_parser(
        "canary", help="compare the versions of a weighted alias from a server's metrics",
        description="Read a running server's Prometheus page and print, for each version NAME@ALIAS "
                    "sends traffic to, its weight, requests, errors, generated tokens and latency "
                    "(time to first token p50/p99, request duration p50, from the engine's per-version "
                    "histograms; counters only behind a cluster's ingress). Counts are since the server "
                    "started.")
    canary.add_argument("ref", metavar="NAME@ALIAS", help="the alias to compare")
    canary.add_argument("--url", default="http://127.0.0.1:8000/metrics",
                        help="the server's metrics page: the HTTP edge's /metrics or the --metrics-port "
                             "page (default: http://127.0.0.1:8000/metrics)")
    canary.add_argument("--json", action="store_true", help="print JSON instead of a table")
    canary.set_defaults(func=cmd_canary)

    untag = actions.add_parser("untag", help="remove an alias", description="Remove ALIAS from adapter NAME.")
    untag.add_argument("name", help="adapter name")
    untag.add_argument("alias", help="alias to remove")
    untag.add_argument("--reason", default="", help="why, for the alias's history")
    untag.set_defaults(func=cmd_untag)

    history = actions.add_parser(
        "history", help="every move of an adapter's aliases",
        description="Every recorded move of NAME's aliases (or of NAME@ALIAS's): when, the version before "
                    "and after, the action (tag, untag, rollback, delete), who (user@host) and why.")
    history.add_argument("ref", metavar="NAME[@ALIAS]", help="adapter name, or one of its aliases")
    history.add_argument("--json", action="store_true", help="print JSON instead of a table")
    history.set_defaults(func=cmd_history)

    rollback = actions.add_parser(
        "rollback", help="move an alias back to its previous target",
        description="Move NAME@ALIAS back to the version it pointed at before its current one, atomically "
                    "(a running server serves it from its next request on). Rolling back again goes "
                    "further back. Recorded in the alias's history.")
    rollback.add_argument("ref", metavar="NAME@ALIAS", help="the alias to roll back")
    rollback.add_argument("--reason", default="", help="why, for the alias's history")
    rollback.set_defaults(func=cmd_rollback)

    rm = actions.add_parser("rm", help="delete one version",
                            description="Delete the version REF means. Refused while an alias points "
                            "at it unless --force (which removes those aliases). Numbers are never reused.")
    rm.add_argument("ref", help=REF_HELP)
    rm.add_argument("--force", action="store_true", help="also delete when aliases point at it")
    rm.set_defaults(func=cmd_rm)

    verify = actions.add_parser("verify", help="rehash files and compare with manifests",
                                description="Rehash every file of one version (REF) or of all versions "
                                "and report mismatches and dangling aliases. Exit status 1 when any.")
    verify.add_argument("ref", nargs="?", help=REF_HELP + " (default: everything)")
    verify.add_argument("--json", action="store_true", help="print JSON results")
    verify.add_argument("--trust", type=Path, metavar="POLICY",
                        help="also require each version to be signed by a key this trust policy "
                        "(as for `serve --trust`) trusts for its name; without it a signature is "
                        "checked only against the files it claims to sign")
    verify.set_defaults(func=cmd_verify)

    pull = actions.add_parser(
        "pull", help="download an adapter from a Hugging Face Hub repo",
        description="Download adapter_config.json, *.safetensors and README.md of a Hub repo at "
        "REVISION (resolved to a commit, recorded in the manifest) and publish them. Pulling the "
        "same commit into the same name again does nothing. Honours HF_ENDPOINT and HF_TOKEN.",
    )
    pull.add_argument("repo_id", help="Hub repo, e.g. ORG/NAME")
    pull.add_argument("--revision", help="branch, tag or commit sha (default: main)")
    pull.add_argument("--name", help="registry name (default: the repo id)")
    pull.add_argument("--base", help="registry base the adapter is for (default: from adapter_config.json)")
    pull.add_argument("--json", action="store_true", help="print the version as JSON")
    add_sign_key_argument(pull)
    pull.set_defaults(func=cmd_pull)

    push = actions.add_parser(
        "push", help="upload a version to a Hugging Face Hub repo",
        description="Create REPO_ID if needed and upload the version's files and model card in one "
        "commit. Prints the commit sha. Honours HF_ENDPOINT and HF_TOKEN.",
    )
    push.add_argument("ref", help=REF_HELP)
    push.add_argument("repo_id", help="Hub repo, e.g. ORG/NAME")
    push.add_argument("--public", action="store_true", help="create the repo public (default: private)")
    push.set_defaults(func=cmd_push)

    add_merge_parser(actions)
    add_sign_parser(actions)

    gc = actions.add_parser("gc", help="clean up after crashed publishes",
                            description="Remove staging dirs of publishes that died and lock files of "
                            "adapters that no longer exist. Running publishes are never touched.")
    gc.add_argument("--json", action="store_true", help="print removed paths as JSON")
    gc.set_defaults(func=cmd_gc)


def version_json(registry: Registry, v: AdapterVersion) -> dict:
    """The manifest plus name, version, ref, digest, path and the aliases pointing at it."""
    aliases = sorted(a for a, target in registry.alias_targets(v.name).items() if v.version in target)
    return {**v.manifest, "name": v.name, "version": v.version, "ref": v.ref,
            "digest": v.digest, "path": str(v.path), "aliases": aliases,
            "evals": [dataclasses.asdict(r) for r in registry.evals(v.ref)]}


def cmd_eval(args: argparse.Namespace) -> int:
    from loradock.evaluation import evaluate  # loads torch and the engine

    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    registry = registry_from(args)
    registry.resolve(args.ref, verify=False)  # an unknown adapter is named before anything else
    if not registry.is_writable():
        raise UserError(f"{registry.root} is read-only here: an evaluation is recorded beside its version")
    result = evaluate(registry, args.ref, args.data, args.metric, args.base_compare, args.max_new_tokens,
                      quantize=args.quantize, device=args.device)
    if args.json:
        print_json({"ref": result.version.ref, "record": dataclasses.asdict(result.record),
                    "answers": [dataclasses.asdict(a) for a in result.answers]})
        return 0
    worst = sorted(result.answers, key=lambda a: a.score)[:10]
    print_table(("QUESTION", "EXPECTED", "ANSWER", "SCORE", *(("BASE",) if args.base_compare else ())),
                [(clip(a.question.question, 40), clip(a.question.expected, 20), clip(a.answer, 40), f"{a.score:.2f}",
                  *((f"{a.base_score:.2f}",) if args.base_compare else ())) for a in worst])
    print(f"{result.version.ref}: {result.record.describe()} (recorded)")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    registry = registry_from(args)
    latest = registry.list()
    if args.json:
        print_json([{**version_json(registry, v), "versions": [x.version for x in registry.versions(v.name)],
                     "all_aliases": registry.aliases(v.name)} for v in latest])
    elif not latest:
        print("no adapters; publish one with `loradock adapters publish DIR --name NAME`")
    else:
        rows = []
        for v in latest:
            aliases = " ".join(f"{a}->" + "+".join(f"{n}" if w == 100 else f"{n}({w}%)" for n, w in sorted(t.items()))
                               for a, t in registry.alias_targets(v.name).items())
            rows.append((v.name, v.version, len(registry.versions(v.name)), aliases or "-",
                         v.manifest["base"]["name"] or "?", v.manifest["rank"], v.manifest["created_at"]))
        print_table(("NAME", "LATEST", "VERSIONS", "ALIASES", "BASE", "RANK", "CREATED"), rows)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    registry = registry_from(args)
    data = version_json(registry, registry.resolve(args.ref))
    if args.json:
        print_json(data)
        return 0
    shown = {**data, "metrics": {k: v for k, v in (data.get("metrics") or {}).items() if k != "curve"}}
    for key in ("ref", "digest", "path", "aliases", "created_at", "base", "peft_type", "rank", "alpha",
                "target_modules", "use_rslora", "source", "parent", "parents", "dataset", "training", "metrics",
                "signature"):
        print(f"{key:15} {shown.get(key)}")
    for series, points in ((data.get("metrics") or {}).get("curve") or {}).items():
        print(f"{'curve':15} {series}: {len(points)} points (drawn on the console's version page)")
    print(f"{'quantization':15} {quantization_line(data)}")
    print("evaluations:" if data["evals"] else f"{'evaluations':15} none (see `loradock adapters eval`)")
    for record in data["evals"]:
        print(f"  {EvalRecord(**record).describe()}")
    print("files:")
    print_table(("  FILE", "SIZE", "SHA256"),
                [(f"  {rel}", e["size"], e["sha256"][:16]) for rel, e in data["files"].items()])
    return 0


def quantization_line(manifest: dict) -> str:
    """The recipe a version was trained with, and how `loradock serve`'s default differs."""
    trained = recorded_recipe(manifest)
    if trained is None:
        return "not recorded (not trained by loradock)"
    served = QuantizationRecipe.named("nf4", trained.compute_dtype)  # serve's default on this dtype
    differences = trained.differences(served)
    return trained.describe() + (f" (serve's default nf4 differs: {'; '.join(differences)})"
                                 if differences else "")


def cmd_publish(args: argparse.Namespace) -> int:
    registry = registry_from(args)
    v = registry.publish(args.dir, args.name, base=args.base, aliases=args.alias, sign_key=args.sign_key)
    if args.json:
        print_json(version_json(registry, v))
    else:
        print(v.ref)
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    registry = registry_from(args)
    v = registry.tag(args.ref, args.alias, args.reason, args.weight, args.require)
    target = registry.alias_targets(v.name)[args.alias]
    print(f"{v.name}@{args.alias} -> " + ", ".join(f"{v.name}@{n} {w}%" for n, w in sorted(target.items()))
          if len(target) > 1 else f"{v.name}@{args.alias} -> {v.ref}")
    return 0


def cmd_canary(args: argparse.Namespace) -> int:
    from loradock.canary_report import rows, version_figures

    name, alias = _alias_ref(args.ref, needed=True)
    registry = registry_from(args)
    weights = registry.alias_targets(name).get(alias)
    if weights is None:
        raise UserError(f"adapter {name!r} has no alias {alias!r}; aliases: {', '.join(registry.aliases(name)) or 'none'}")
    try:
        with urllib.request.urlopen(args.url, timeout=10) as answer:
            page = answer.read().decode()
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise UserError(f"cannot read metrics from {args.url}: {getattr(e, 'reason', e)} (is the server "
                        "running? give its metrics page with --url)") from None
    headers, table = rows(version_figures(page, name), weights, name)
    if args.json:
        print_json([dict(zip(headers, row, strict=True)) for row in table])
        return 0
    print(f"{name}@{alias}: " + ", ".join(f"{w}% -> {name}@{v}" for v, w in sorted(weights.items(), key=lambda i: -i[1]))
          + f" (metrics of {args.url}, since the server started)")
    print_table(headers, table)
    return 0


def cmd_untag(args: argparse.Namespace) -> int:
    registry_from(args).untag(args.name, args.alias, args.reason)
    print(f"removed alias {args.name}@{args.alias}")
    return 0


def _alias_ref(ref: str, needed: bool) -> tuple[str, str | None]:
    name, _, alias = ref.partition("@")
    if alias.isdigit() or (needed and not alias):
        raise UserError(f"{ref!r}: give NAME@ALIAS (an alias, not a version number)")
    return name, alias or None


def cmd_history(args: argparse.Namespace) -> int:
    name, alias = _alias_ref(args.ref, needed=False)
    histories = registry_from(args).alias_history(name, alias)
    if args.json:
        print_json({a: [dataclasses.asdict(c) for c in changes] for a, changes in histories.items()})
        return 0
    rows = [(c.time, f"{name}@{a}", c.action, "-" if c.before is None else c.before,
             "-" if c.after is None else c.after, c.by, c.reason + ("" if c.applied else " (interrupted: not applied)"))
            for a, changes in histories.items() for c in changes]
    if not rows:
        print(f"no recorded alias moves for {args.ref}")
        return 0
    print_table(("TIME", "ALIAS", "ACTION", "FROM", "TO", "BY", "REASON"), sorted(rows, key=lambda row: row[0]))
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    name, alias = _alias_ref(args.ref, needed=True)
    v = registry_from(args).rollback(name, alias, args.reason)
    print(f"{name}@{alias} -> {v.ref} (rolled back)")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    v = registry_from(args).delete(args.ref, force=args.force)
    print(f"deleted {v.ref}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    policy = TrustPolicy.load(args.trust) if args.trust else None
    results = registry_from(args).verify(args.ref, policy)
    bad = [r for r in results if not r.ok]
    if args.json:
        print_json([{"ref": r.ref, "ok": r.ok, "problems": list(r.problems), "signer": r.signer,
                     "trust": r.trust} for r in results])
    else:
        for r in bad:
            print(f"{r.ref}: FAILED")
            for problem in r.problems:
                print(f"  {problem}")
        signed = sum(1 for r in results if r.signer)
        trusted = f", {sum(r.trust == 'trusted' for r in results)} trusted" if policy else ""
        summary = f" ({signed} signed{trusted})" if signed or policy else ""
        print(f"{len(results) - len(bad)} ok, {len(bad)} failed{summary}")
    return 1 if bad else 0


def _show_hub_progress() -> None:
    """huggingface_hub draws its own tqdm bars; make sure nothing turned them off in-process
    (HF_HUB_DISABLE_PROGRESS_BARS=1 set by the user still wins)."""
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars

    if are_progress_bars_disabled():
        enable_progress_bars()


def cmd_pull(args: argparse.Namespace) -> int:
    _show_hub_progress()
    registry = registry_from(args)
    v = registry.pull(args.repo_id, revision=args.revision, name=args.name, base=args.base,
                      sign_key=args.sign_key)
    if args.json:
        print_json(version_json(registry, v))
    else:
        print(v.ref)
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    _show_hub_progress()
    commit = registry_from(args).push(args.ref, args.repo_id, private=not args.public)
    print(commit)
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    removed = registry_from(args).gc()
    if args.json:
        print_json([str(p) for p in removed])
    else:
        for p in removed:
            print(f"removed {p}")
        print(f"{len(removed)} removed")
    return 0
