"""What the console reads of a registry (runtime/http/console/facts.py), without a browser:
lineage edges from every kind of origin, the model card rendered safely, servable reasons,
and the listing following the registry's changes."""

from __future__ import annotations

from pathlib import Path

import pytest
from loradock.registry import Registry
from loradock.runtime.http.console.facts import (
    RegistryView,
    ServedBase,
    curve_chart,
    model_card_html,
)

from tests.adapters import make_lora_adapter
from tests.conftest import TINY_BASE


@pytest.fixture(scope="module")
def home(tiny_base, session_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Registry:
    root = tmp_path_factory.mktemp("console-facts") / "home"
    root.mkdir()
    (root / "bases").symlink_to(session_home / "bases")
    src = tmp_path_factory.mktemp("console-facts-src")
    registry = Registry(root)
    a = make_lora_adapter(tiny_base.path, src / "a", rank=4, seed=1)
    b = make_lora_adapter(tiny_base.path, src / "b", rank=8, seed=2)
    registry.publish(a, "med", base=TINY_BASE, aliases=["prod"])
    registry.publish(b, "med", base=TINY_BASE, metadata={"source": {"kind": "trained"}, "parent": "med@1"})
    registry.publish(a, "law", base=TINY_BASE, metadata={
        "source": {"kind": "hub", "repo": "org/law-lora", "revision": "main", "commit": "c0ffee" * 6 + "abcd"}})
    v1, v2 = registry.resolve("med@1"), registry.resolve("med@2")
    registry.publish(b, "mix", base=TINY_BASE, metadata={"source": {"kind": "merge", "strategy": "linear"}, "parents": [
        {"ref": "med@2", "digest": v2.digest, "weight": 0.7}, {"ref": "law@1", "digest": v1.digest, "weight": 0.3}]})
    registry.tag("med@2", "prod", "better")
    return registry


def edges(graph: dict) -> set[tuple[str, str, str]]:
    return {(e["from"], e["to"], e["label"]) for e in graph["edges"]}


def test_lineage_joins_parents_merges_hub_origins_and_alias_moves(home: Registry):
    view = RegistryView(home)
    med2 = edges(view.version("med@2")["lineage"])
    assert ("med@1", "med@2", "trained from; replaced under @prod") in med2  # one arrow, both reasons
    assert ("med@2", "mix@1", "merged × 0.7") in med2  # what came of it
    law = view.version("law@1")["lineage"]
    hub = next(n for n in law["nodes"] if n["id"].startswith("hub:"))
    assert hub["column"] == -1 and hub["href"] == f"https://huggingface.co/org/law-lora/tree/{'c0ffee' * 6}abcd"
    assert ("law@1", "mix@1", "merged × 0.3") in edges(law)
    mix = view.version("mix@1")["lineage"]
    assert {n["id"] for n in mix["nodes"] if n["column"] == -1} == {"med@2", "law@1"}
    for edge in mix["edges"]:  # laid out left to right, inside the drawing
        assert 0 <= edge["x1"] < edge["x2"] <= mix["width"] and 0 <= edge["y1"] <= mix["height"]


def test_the_listing_says_what_this_server_can_serve_and_follows_the_registry(home: Registry, tiny_base, tmp_path):
    view = RegistryView(home, ServedBase(TINY_BASE, tiny_base.fingerprint, max_rank=4))
    rows = {a["name"]: a for a in view.adapters()}
    assert rows["med"]["latest"]["unservable"] == "rank 8 is above this server's --max-rank 4"
    assert rows["med"]["versions"][1]["unservable"] == ""
    assert rows["med"]["aliases"] == {"prod": {2: 100}} and rows["med"]["latest"]["aliases"] == ["prod"]
    other = RegistryView(home, ServedBase("other", "f" * 64, max_rank=64)).adapters()
    assert other[0]["latest"]["unservable"].startswith("trained for base tiny-llama")
    home.tag("med@1", "prod", "canary", weight=10)
    rows = {a["name"]: a for a in view.adapters()}  # a new generation: rebuilt
    assert rows["med"]["aliases"] == {"prod": {1: 10, 2: 90}}
    assert [v["aliases"] for v in rows["med"]["versions"]] == [["prod 90%"], ["prod 10%"]]
    home.rollback("med", "prod")


def test_a_model_card_is_rendered_without_running_its_html(tmp_path: Path):
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n# Card\n\n<script>alert(1)</script>\n\n"
                                        "[x](javascript:alert(1)) | a | b |\n|---|---|\n| 1 | 2 |\n")
    html = model_card_html(tmp_path)
    assert "<h1>Card</h1>" in html and "license" not in html
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert 'href="javascript:' not in html
    assert model_card_html(tmp_path / "missing") == ""


def test_the_curve_is_placed_in_the_plot_box():
    chart = curve_chart({"curve": {"loss": [[1, 4.0], [2, 2.0], [3, 1.0]], "eval_loss": [[3, 1.5]]}})
    loss = next(s for s in chart["series"] if s["name"] == "loss")
    assert [p[:2] for p in loss["points"]] == [[1, 4.0], [2, 2.0], [3, 1.0]]
    xs, ys = [p[2] for p in loss["points"]], [p[3] for p in loss["points"]]
    assert xs == sorted(xs) and ys == sorted(ys)  # later steps right, lower losses down
    assert (chart["min"], chart["max"], chart["first"], chart["last"]) == (1.0, 4.0, 1, 3)
    assert curve_chart({"train_loss": 0.1}) is None
