"""What the console shows of the registry, as plain data for its pages: one row per adapter
name with its versions, a version's whole record (manifest, model card, training curve,
evaluations, trust) and its lineage as a graph.

Everything is read from the registry's files; nothing here loads torch. The listing is built
once per registry generation (`RegistryView`), so a page of 1,000 versions costs one scan.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from loradock.registry import (
    AdapterVersion,
    AliasChange,
    Registry,
    RegistryError,
    newest_per_metric,
)
from loradock.registry.quantization import recorded_recipe
from loradock.registry.signing import UNCHECKED, UNSIGNED, claimed_signer
from loradock.registry.trust import TrustPolicy
from markdown_it import MarkdownIt

from ..models import unservable_reason

MODEL_CARD = "README.md"
MODEL_CARD_MAX_BYTES = 256 * 1024
# Raw HTML in a model card (a Hub card is anyone's text) is shown as text, never run.
_markdown = MarkdownIt("commonmark", {"html": False}).enable("table")


@dataclass(frozen=True)
class ServedBase:
    """What the server serves, to say which versions it can serve (None under `loradock ui`)."""

    name: str
    fingerprint: str
    max_rank: int


def _size(manifest: dict) -> int:
    return sum(int(entry.get("size", 0)) for entry in manifest.get("files", {}).values())


def _servable(v: AdapterVersion, served: ServedBase | None) -> str:
    """"" when `served` (or, without a server, loradock's runtime) can serve `v`, else why not."""
    if not v.manifest.get("servable", True):
        return "; ".join(v.manifest.get("not_servable_because") or ["not servable by loradock"])
    if served is None:
        return ""
    return unservable_reason(v.manifest, served.fingerprint, served.max_rank, served.name)


def _trust(v: AdapterVersion, policy: TrustPolicy | None) -> dict:
    """{"signer", "state", "reason"}: the signature's claimed key id, and the policy's verdict."""
    if policy is None:
        signer = claimed_signer(v.path)
        return {"signer": signer, "state": UNCHECKED if signer else UNSIGNED, "reason": ""}
    status = policy.check(v)
    return {"signer": status.signer, "state": status.state, "reason": status.reason}


def version_row(v: AdapterVersion, aliases: list[str], served: ServedBase | None,
                policy: TrustPolicy | None, evals: list[dict]) -> dict:
    """One version as the adapters page lists it."""
    m = v.manifest
    recipe = recorded_recipe(m)
    return {
        "ref": v.ref, "name": v.name, "version": v.version, "digest": v.digest,
        "created_at": m.get("created_at", ""), "size": _size(m),
        "rank": m.get("rank"), "alpha": m.get("alpha"), "targets": list(m.get("target_modules") or []),
        "peft_type": m.get("peft_type", ""), "base": (m.get("base") or {}).get("name") or "",
        "base_fingerprint": (m.get("base") or {}).get("fingerprint") or "",
        "recipe": recipe.describe() if recipe else "", "source": (m.get("source") or {}).get("kind", ""),
        "aliases": aliases, "trust": _trust(v, policy), "unservable": _servable(v, served), "evals": evals,
    }


def _alias_labels(targets: dict[str, dict[int, int]]) -> dict[int, list[str]]:
    """{version: ["prod", "canary 10%"]}: the aliases pointing at each version, with a canary's weight."""
    labels: dict[int, list[str]] = {}
    for alias, split in sorted(targets.items()):
        for number, weight in sorted(split.items()):
            labels.setdefault(number, []).append(alias if weight == 100 else f"{alias} {weight}%")
    return labels


class RegistryView:
    """The registry as the console's pages read it, rebuilt when the registry's generation moves."""

    def __init__(self, registry: Registry, served: ServedBase | None = None,
                 policy: TrustPolicy | None = None) -> None:
        self.registry = registry
        self.served = served
        self.policy = policy
        self._lock = threading.Lock()
        self._generation: int | None = None
        self._adapters: list[dict] = []
        self._children: dict[str, list[tuple[str, str]]] = {}

    def adapters(self) -> list[dict]:
        """One entry per name, sorted by name: {"name", "latest" (a version row), "versions"
        (newest first), "aliases": {alias: {version: weight}}}."""
        self._refresh()
        return self._adapters

    def children(self, ref: str) -> list[tuple[str, str]]:
        """(ref, how) of the versions trained from or merged from `ref`."""
        self._refresh()
        return self._children.get(ref, [])

    def _refresh(self) -> None:
        with self._lock:
            generation = self.registry.generation()
            if generation == self._generation:
                return
            adapters, children = [], {}
            for latest in self.registry.list():
                try:
                    versions = self.registry.versions(latest.name)
                    targets = self.registry.alias_targets(latest.name)
                except RegistryError:  # deleted or damaged while listing
                    continue
                labels = _alias_labels(targets)
                rows = [version_row(v, labels.get(v.version, []), self.served, self.policy,
                                    [asdict(r) for r in newest_per_metric(self.registry.evals(v))])
                        for v in reversed(versions)]
                adapters.append({"name": latest.name, "latest": rows[0], "versions": rows, "aliases": targets})
                for v in versions:
                    for parent, how in _parents(v):
                        children.setdefault(parent, []).append((v.ref, how))
            self._adapters, self._children, self._generation = adapters, children, generation

    def version(self, ref: str) -> dict:
        """Everything the version page shows of `ref` (a reference: `name@N`, `name@alias` or `name`)."""
        v = self.registry.resolve(ref, verify=False)
        targets = self.registry.alias_targets(v.name)
        m = v.manifest
        history = self.registry.alias_history(v.name)
        return {
            **version_row(v, _alias_labels(targets).get(v.version, []), self.served, self.policy,
                          [asdict(r) for r in self.registry.evals(v)]),
            "manifest": m, "files": m.get("files", {}), "path": str(v.path),
            "model_card": model_card_html(v.path),
            "curve": curve_chart(m.get("metrics") or {}),
            "lineage": self.lineage(v, history),
            "alias_names": sorted(targets),
            "history": {alias: [asdict(c) for c in changes] for alias, changes in history.items()},
        }

    def lineage(self, v: AdapterVersion, history: dict[str, list[AliasChange]]) -> dict:
        """The version's neighbours (`history`: its name's alias history) as a graph: {"nodes": [{"id", "label", "href", "column"}],
        "edges": [{"from", "to", "label"}]}; column -1 is where it came from, 1 what came of it."""
        nodes: dict[str, dict] = {v.ref: {"id": v.ref, "label": v.ref, "href": _href(v.ref), "column": 0}}
        edges: list[dict] = []

        def add(node_id: str, label: str, column: int, href: str | None) -> None:
            nodes.setdefault(node_id, {"id": node_id, "label": label, "href": href, "column": column})

        source = v.manifest.get("source") or {}
        if source.get("kind") == "hub":
            origin = f"hub:{source['repo']}@{str(source['commit'])[:12]}"
            add(origin, f"Hub {source['repo']} @ {str(source['commit'])[:12]}", -1,
                f"https://huggingface.co/{source['repo']}/tree/{source['commit']}")
            edges.append({"from": origin, "to": v.ref, "label": "pulled"})
        elif source.get("kind") == "import" and source.get("path"):
            origin = f"dir:{source['path']}"
            add(origin, f"imported {Path(source['path']).name}", -1, None)
            edges.append({"from": origin, "to": v.ref, "label": "imported"})
        for parent, how in _parents(v):
            add(parent, parent, -1, _href(parent))
            edges.append({"from": parent, "to": v.ref, "label": how})
        for child, how in self.children(v.ref):
            add(child, child, 1, _href(child))
            edges.append({"from": v.ref, "to": child, "label": how})
        for alias, changes in history.items():
            for change in changes:
                before, after = _main_version(change.before), _main_version(change.after)
                if before is None or after is None or before == after or not change.applied:
                    continue
                if after == v.version:
                    ref = f"{v.name}@{before}"
                    add(ref, ref, -1, _href(ref))
                    edges.append({"from": ref, "to": v.ref, "label": f"replaced under @{alias}"})
                elif before == v.version:
                    ref = f"{v.name}@{after}"
                    add(ref, ref, 1, _href(ref))
                    edges.append({"from": v.ref, "to": ref, "label": f"replaced it under @{alias}"})
        labels: dict[tuple[str, str], list[str]] = {}  # one arrow per pair, its reasons joined
        for e in edges:
            reasons = labels.setdefault((e["from"], e["to"]), [])
            if e["label"] not in reasons:
                reasons.append(e["label"])
        joined = [{"from": a, "to": b, "label": "; ".join(reasons)} for (a, b), reasons in labels.items()]
        return layout({"nodes": list(nodes.values()), "edges": joined})


def _href(ref: str) -> str:
    name, _, number = ref.rpartition("@")
    return f"/ui/adapters/{name}/{number}"


def _main_version(target: int | dict[str, int] | None) -> int | None:
    """The version an alias target sends most traffic to (a canary's stable one)."""
    if isinstance(target, dict):
        return int(max(target.items(), key=lambda item: item[1])[0]) if target else None
    return target


def _parents(v: AdapterVersion) -> list[tuple[str, str]]:
    """(ref, how) of what `v` was made from: the version it was trained on, or a merge's parents."""
    m = v.manifest
    found = [(m["parent"], "trained from")] if m.get("parent") else []
    found += [(p["ref"], f"merged × {p['weight']:g}") for p in m.get("parents") or []]
    return found


NODE_W, NODE_H, GAP_X, GAP_Y = 200, 36, 190, 30


def layout(graph: dict) -> dict:
    """Place the nodes in three columns (origins, the version, what came of it) for an SVG of
    `width` x `height`: each node gets x, y (its top left) and each edge its end points (every
    edge joins the version to a node of another column)."""
    columns: dict[int, list[dict]] = {-1: [], 0: [], 1: []}
    for node in graph["nodes"]:
        columns[node["column"]].append(node)
    rows = max(len(c) for c in columns.values())
    height = rows * NODE_H + (rows - 1) * GAP_Y
    for column, members in columns.items():
        top = (height - (len(members) * NODE_H + (len(members) - 1) * GAP_Y)) / 2
        for i, node in enumerate(members):
            node["x"] = (column + 1) * (NODE_W + GAP_X)
            node["y"] = top + i * (NODE_H + GAP_Y)
    at = {node["id"]: node for node in graph["nodes"]}
    for edge in graph["edges"]:
        a, b = at[edge["from"]], at[edge["to"]]
        left, right = (a, b) if a["x"] <= b["x"] else (b, a)
        edge.update(x1=left["x"] + NODE_W, y1=left["y"] + NODE_H / 2, x2=right["x"], y2=right["y"] + NODE_H / 2)
    return {**graph, "width": 3 * NODE_W + 2 * GAP_X, "height": height, "node_w": NODE_W, "node_h": NODE_H}


def model_card_html(version_dir: Path) -> str:
    """The version's README.md as HTML (front matter left out, raw HTML escaped); "" without one."""
    path = version_dir / MODEL_CARD
    try:
        with path.open("rb") as f:
            text = f.read(MODEL_CARD_MAX_BYTES).decode("utf-8", errors="replace")
    except OSError:
        return ""
    if text.startswith("---\n"):
        end = text.find("\n---", 4)
        if end != -1:
            text = text[end + 4:]
    return _markdown.render(text)


def curve_chart(metrics: dict) -> dict | None:
    """The recorded loss curves (the trainer's `metrics.curve`) placed in the page's plot box:
    {"series": [{"name", "points": [[step, value, x, y]...], "path"}], "min", "max", "first",
    "last"}; None when none were recorded."""
    series = []
    recorded = metrics.get("curve") or {}
    data = {name: [(float(s), float(v)) for s, v in points] for name, points in recorded.items()
            if isinstance(points, list) and points}
    if not data:
        return None
    lo = min(v for points in data.values() for _, v in points)
    hi = max(v for points in data.values() for _, v in points)
    first = min(s for points in data.values() for s, _ in points)
    last = max(s for points in data.values() for s, _ in points)
    for name, points in sorted(data.items()):
        xy = [(PLOT_LEFT + PLOT_W * ((s - first) / (last - first) if last > first else 0.5),
               PLOT_TOP + PLOT_H * (1 - ((v - lo) / (hi - lo) if hi > lo else 0.5))) for s, v in points]
        series.append({"name": name, "points": [[s, v, round(x, 1), round(y, 1)] for (s, v), (x, y) in zip(points, xy, strict=True)],
                       "path": " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)})
    return {"series": series, "min": lo, "max": hi, "first": first, "last": last}


PLOT_LEFT, PLOT_TOP, PLOT_W, PLOT_H = 56, 12, 520, 200
