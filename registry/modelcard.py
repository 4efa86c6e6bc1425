"""The model card (`README.md`) written into every version: Hub-style YAML front matter + a summary."""

from __future__ import annotations

import yaml

CARD_FILE = "README.md"


def strip_front_matter(card: str) -> str:
    """A model card's markdown without its leading `---` YAML block."""
    if card.startswith("---\n"):
        end = card.find("\n---", 4)
        if end != -1:
            return card[end + 4 :].lstrip("\n")
    return card


def render_model_card(ref: str, manifest: dict, upstream: str | None = None) -> str:
    """Markdown with front matter `base_model`, `library_name: peft`, `tags`, `metrics`.

    `upstream` is the card the adapter came with (Hub pulls); its text is kept below ours.
    """
    base = manifest["base"]
    metrics = {k: v for k, v in manifest["metrics"].items() if isinstance(v, int | float)}
    front = {
        "base_model": base["name"],
        "library_name": "peft",
        "tags": ["lora", "loradock", f"base_fingerprint:{(base['fingerprint'] or 'unknown')[:12]}"],
    }
    if metrics:
        front["metrics"] = metrics
    source = manifest["source"]
    origin = {
        "trained": "trained with loradock",
        "hub": f"pulled from {source.get('repo')} at commit {source.get('commit')}",
        "import": f"imported from {source.get('path')}",
        "merge": f"merged with strategy {source.get('strategy')} from "
                 + ", ".join(f"{p['ref']} (weight {p['weight']})" for p in manifest.get("parents") or []),
    }.get(source["kind"], source["kind"])
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=True).strip(),
        "---",
        "",
        f"# {ref}",
        "",
        f"A LoRA adapter (rank {manifest['rank']}, alpha {manifest['alpha']}"
        f"{', rsLoRA' if manifest['use_rslora'] else ''}) for `{base['name']}`, {origin}.",
        "",
        f"Target modules: {', '.join(manifest['target_modules'])}.",
    ]
    if manifest["parent"]:
        lines += ["", f"Parent version: {manifest['parent']}."]
    if manifest["dataset"]:
        lines += ["", f"Dataset digest: {manifest['dataset'].get('digest')}."]
    if metrics:
        lines += ["", "| metric | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in sorted(metrics.items())]]
    lines += ["", "Load with `PeftModel.from_pretrained(base_model, this_directory)`.", ""]
    if upstream and strip_front_matter(upstream).strip():
        lines += ["## Upstream model card", "", strip_front_matter(upstream).strip(), ""]
    return "\n".join(lines)
