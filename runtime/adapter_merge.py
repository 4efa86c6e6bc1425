"""Merge LoRA adapters into one: the semantics of PEFT's `LoraModel.add_weighted_adapter`,
on plain state dicts and configs (no model needed).

Used by `loradock adapters merge` (which publishes the result with its lineage) and by the
engine's per-request mixtures. The arithmetic is `peft.utils.merge_utils`; only DARE's random
pruning is redone here with an explicit `torch.Generator`, so that a merge is reproducible
from its recipe and never touches the process-wide RNG that other threads sample from.

Strategies (weights w_i, PEFT scaling s_i = alpha_i / r_i, per targeted module):
  linear, ties, dare_linear, dare_ties: A and B are combined separately, each side weighted by
      sqrt(w_i * s_i); all adapters need the same rank, which the result keeps.
  cat: A = concat(w_i * s_i * A_i), B = concat(B_i); rank = sum of the ranks.
  svd: delta = sum(w_i * s_i * B_i @ A_i), truncated SVD back to the largest rank.
The result has lora_alpha = r (scaling 1), as PEFT's does.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft.utils.merge_utils import (
    calculate_majority_sign_mask,
    disjoint_merge,
    reshape_weight_task_tensors,
    task_arithmetic,
    ties,
)
from peft.utils.other import get_pattern_key
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
STRATEGIES = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")
DENSITY_STRATEGIES = frozenset({"ties", "dare_linear", "dare_ties"})
SIGN_STRATEGIES = frozenset({"ties", "dare_ties"})
EQUAL_RANK_STRATEGIES = frozenset({"linear", "ties", "dare_linear", "dare_ties"})
SIGN_METHODS = ("total", "frequency")
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
_PREFIX = "base_model.model."


class MergeError(ValueError):
    """The adapters or the recipe cannot be merged; the message names the problem."""


@dataclass(frozen=True)
class MergeRecipe:
    """How to combine adapters: one weight per adapter, in order."""

    weights: tuple[float, ...]
    strategy: str = "linear"
    density: float | None = None  # fraction kept by ties / dare_*
    majority_sign_method: str = "total"  # ties / dare_ties
    seed: int = 0  # DARE's random masks

    def problems(self, count: int) -> list[str]:
        """What is wrong with this recipe for `count` adapters (empty when nothing)."""
        out = []
        if count < 1:
            out.append("name at least one adapter")
        if len(self.weights) != count:
            out.append(f"{len(self.weights)} weights for {count} adapters: give one weight per adapter")
        bad = [w for w in self.weights if not (isinstance(w, int | float) and math.isfinite(w) and w > 0)]
        if bad:
            out.append(f"weights must be finite numbers > 0, got {', '.join(map(repr, bad))}")
        if self.strategy not in STRATEGIES:
            out.append(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        elif self.strategy in DENSITY_STRATEGIES:
            d = self.density
            if d is None or not (isinstance(d, int | float) and math.isfinite(d) and 0 < d <= 1):
                out.append(f"strategy {self.strategy} needs a density in (0, 1], got {d!r}")
        elif self.density is not None:
            out.append(f"density applies to {', '.join(sorted(DENSITY_STRATEGIES))}, "
                       f"not to {self.strategy}")
        if self.majority_sign_method not in SIGN_METHODS:
            out.append(f"majority_sign_method must be one of {', '.join(SIGN_METHODS)}, "
                       f"got {self.majority_sign_method!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            out.append(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        return out

    def normalized(self) -> MergeRecipe:
        """The same merge with the settings its strategy ignores reset, so equal merges compare equal."""
        return MergeRecipe(
            tuple(float(w) for w in self.weights), self.strategy,
            self.density if self.strategy in DENSITY_STRATEGIES else None,
            self.majority_sign_method if self.strategy in SIGN_STRATEGIES else "total",
            self.seed if self.strategy.startswith("dare") else 0)

    def as_json(self) -> dict:
        """The recipe as recorded in lineage (weights are listed with each parent)."""
        out: dict = {"strategy": self.strategy}
        if self.strategy in DENSITY_STRATEGIES:
            out["density"] = self.density
        if self.strategy in SIGN_STRATEGIES:
            out["majority_sign_method"] = self.majority_sign_method
        if self.strategy.startswith("dare"):
            out["seed"] = self.seed
        return out


@dataclass(frozen=True)
class MergeInput:
    """One adapter to merge: its PEFT config and state dict (keys as PEFT saves them)."""

    label: str  # how errors name it, e.g. "medical@3"
    config: dict
    tensors: dict[str, torch.Tensor] = field(repr=False)
    base_fingerprint: str | None = None


def read_peft_dir(label: str, path: Path, base_fingerprint: str | None = None) -> MergeInput:
    """Read a PEFT adapter directory (safetensors only)."""
    path = Path(path)
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
        tensors = load_safetensors((path / WEIGHTS_FILE).read_bytes())
    except (OSError, ValueError) as e:
        raise MergeError(f"{label}: cannot read its PEFT files ({e})") from e
    return MergeInput(label, config, tensors, base_fingerprint)


def write_peft_dir(config: dict, tensors: dict[str, torch.Tensor], out: Path) -> None:
    """Write a merge result as a PEFT adapter directory (`PeftModel.from_pretrained` loads it)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / WEIGHTS_FILE),
              metadata={"format": "pt"})


def _max_rank(config: dict) -> int:
    # PEFT sizes the merged adapter by the largest rank an adapter may have anywhere.
    return max([config.get("r", 8), *(config.get("rank_pattern") or {}).values()])


def merged_rank(configs: Sequence[dict], strategy: str) -> int:
    """The rank of the merge (PEFT's rule): the sum for cat, the largest for svd, else the common one."""
    ranks = [_max_rank(c) for c in configs]
    if len(ranks) == 1:
        return ranks[0]
    return {"cat": sum(ranks), "svd": max(ranks)}.get(strategy, ranks[0])


def config_problems(labels: Sequence[str], configs: Sequence[dict], bases: Sequence[str | None],
                    recipe: MergeRecipe) -> list[str]:
    """Every reason these adapters cannot be merged with `recipe`, from their configs alone
    (cheap: run before reading any weights)."""
    problems = recipe.problems(len(configs))
    for label, config in zip(labels, configs, strict=True):
        if not isinstance(config, dict):
            problems.append(f"{label}: {CONFIG_FILE} is not a JSON object")
            continue
        if config.get("peft_type", "LORA") != "LORA":
            problems.append(f"{label} is a {config.get('peft_type')} adapter; only LoRA adapters merge")
        unsupported = [k for k, bad in (("use_dora", config.get("use_dora")),
                                        ("lora_bias", config.get("lora_bias")),
                                        ("bias", config.get("bias", "none") != "none"),
                                        ("modules_to_save", config.get("modules_to_save")),
                                        ("fan_in_fan_out", config.get("fan_in_fan_out"))) if bad]
        if unsupported:
            problems.append(f"{label} sets {', '.join(unsupported)}: merging covers plain LoRA weights only")
    known = {(label, fp) for label, fp in zip(labels, bases, strict=True) if fp}
    if len({fp for _, fp in known}) > 1:
        listed = ", ".join(f"{label} on base {fp[:12]}" for label, fp in sorted(known))
        problems.append(f"the adapters were trained on different bases ({listed})")
    if recipe.strategy in EQUAL_RANK_STRATEGIES and all(isinstance(c, dict) for c in configs):
        ranks = [_max_rank(c) for c in configs]
        if len(set(ranks)) > 1:
            listed = ", ".join(f"{label} r={r}" for label, r in zip(labels, ranks, strict=True))
            problems.append(f"strategy {recipe.strategy} needs adapters of equal rank ({listed}); "
                            "use cat or svd for different ranks")
    return problems


def check_mergeable(labels: Sequence[str], configs: Sequence[dict], bases: Sequence[str | None],
                    recipe: MergeRecipe) -> None:
    problems = config_problems(labels, configs, bases, recipe)
    if problems:
        raise MergeError("cannot merge: " + "; ".join(problems))


def _scaling(config: dict, module: str, rank: int) -> float:
    """PEFT's scaling of `module`: its alpha (alpha_pattern first) over r (sqrt(r) with rsLoRA)."""
    patterns = config.get("alpha_pattern") or {}
    key = get_pattern_key(patterns.keys(), module)
    alpha = patterns.get(key, config.get("lora_alpha", 8))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _modules(inp: MergeInput) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    unexpected = []
    for key, tensor in inp.tensors.items():
        m = _KEY.match(key)
        if m is None:
            unexpected.append(key)
            continue
        pairs.setdefault(m["module"], {})[m["ab"]] = tensor
    incomplete = sorted(name for name, ab in pairs.items() if set(ab) != {"A", "B"})
    if unexpected or incomplete:
        raise MergeError(f"{inp.label}: not plain LoRA weights (unexpected tensors {unexpected[:3]}, "
                         f"incomplete pairs {incomplete[:3]})")
    return {name: (ab["A"], ab["B"]) for name, ab in pairs.items()}


def _random_prune(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """merge_utils.random_pruning(rescale=True), drawing from `generator`."""
    if density >= 1:
        return t
    mask = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * mask / density


def _combine(strategy: str, tensors: list[torch.Tensor], weights: torch.Tensor, recipe: MergeRecipe,
             generator: torch.Generator) -> torch.Tensor:
    """merge_utils' task arithmetic for one side (A or B) of one module."""
    if strategy == "linear":
        return task_arithmetic(tensors, weights)
    if strategy == "ties":
        return ties(tensors, weights, recipe.density, recipe.majority_sign_method)
    stacked = torch.stack([_random_prune(t, recipe.density, generator) for t in tensors])
    weighted = stacked * reshape_weight_task_tensors(stacked, weights)
    if strategy == "dare_linear":
        return weighted.sum(dim=0)
    mask = calculate_majority_sign_mask(stacked, method=recipe.majority_sign_method)  # dare_ties
    return disjoint_merge(weighted, mask)


def _merged_config(inputs: Sequence[MergeInput], rank: int) -> dict:
    first = inputs[0].config
    targets = [inp.config.get("target_modules") for inp in inputs]
    if all(isinstance(t, str) for t in targets):
        merged_targets: str | list[str] = "|".join(f"({t})" for t in targets)
    else:
        merged_targets = sorted({t for ts in targets if ts for t in ([ts] if isinstance(ts, str) else ts)})
    # use_rslora is dropped: the scalings are folded into the weights, so r / r = 1 is right
    # (PEFT keeps the first adapter's flag, which would rescale the merge by sqrt(r)).
    return {**first, "r": rank, "lora_alpha": rank, "target_modules": merged_targets,
            "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False}


def merge_adapters(
    inputs: Sequence[MergeInput],
    recipe: MergeRecipe,
    module_order: Sequence[str] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Merge `inputs` with `recipe` -> (adapter_config, state dict), as PEFT would save them.

    `module_order` is the base model's module order (`named_modules`); PEFT merges in that order,
    which only matters for DARE's random masks. `generator` defaults to one seeded by
    `recipe.seed`. Raises MergeError naming every incompatibility.
    """
    check_mergeable([i.label for i in inputs], [i.config for i in inputs],
                    [i.base_fingerprint for i in inputs], recipe)
    strategy = recipe.strategy if len(inputs) > 1 else "linear"  # as PEFT: one adapter is linear
    per_input = [_modules(inp) for inp in inputs]
    names = set().union(*per_input)
    if module_order is not None:
        order = list(module_order)
        foreign = sorted(names - set(order))
        if foreign:
            raise MergeError(f"modules not in the base model: {', '.join(foreign[:5])}")
        ordered = [n for n in order if n in names]
    else:
        ordered = sorted(names, key=lambda n: [int(p) if p.isdigit() else p for p in n.split(".")])
    new_rank = merged_rank([inp.config for inp in inputs], strategy)
    if generator is None:
        generator = torch.Generator().manual_seed(recipe.seed)

    problems: list[str] = []
    out: dict[str, torch.Tensor] = {}
    for name in ordered:
        parts = [(inp, mods[name], w) for inp, mods, w in zip(inputs, per_input, recipe.weights, strict=True)
                 if name in mods]
        shapes = {(A.shape[1], B.shape[0]) for _, (A, B), _ in parts}
        if len(shapes) > 1:
            listed = ", ".join(f"{inp.label} {A.shape[1]}->{B.shape[0]}" for inp, (A, B), _ in parts)
            problems.append(f"{name}: the adapters disagree on the layer's shape ({listed})")
            continue
        dtype = parts[0][1][0].dtype
        As = [A.float() for _, (A, _B), _ in parts]
        Bs = [B.float() for _, (_A, B), _ in parts]
        scalings = [_scaling(inp.config, name, A.shape[0]) for inp, (A, _B), _ in parts]
        weights = [w for _, _, w in parts]
        if strategy == "cat":
            A = torch.cat([A * w * s for A, w, s in zip(As, weights, scalings, strict=True)], dim=0)
            B = torch.cat(Bs, dim=1)
            A = torch.nn.functional.pad(A, (0, 0, 0, new_rank - A.shape[0]))
            B = torch.nn.functional.pad(B, (0, new_rank - B.shape[1]))
        elif strategy == "svd":
            deltas = [(B @ A) * s for A, B, s in zip(As, Bs, scalings, strict=True)]
            U, S, Vh = torch.linalg.svd(task_arithmetic(deltas, torch.tensor(weights)), full_matrices=True)
            B, A = U[:, :new_rank] @ torch.diag(S[:new_rank]), Vh[:new_rank, :]
        else:
            if len({A.shape[0] for A in As}) > 1:
                problems.append(f"{name}: strategy {strategy} needs equal ranks, found "
                                f"{sorted({A.shape[0] for A in As})}")
                continue
            # Each side carries sqrt(w * scaling), so B @ A carries w * scaling once.
            roots = [math.sqrt(w * s) for w, s in zip(weights, scalings, strict=True)]
            A = _combine(strategy, As, torch.tensor(roots), recipe, generator)
            B = _combine(strategy, Bs, torch.tensor(roots), recipe, generator)
        out[f"{_PREFIX}{name}.lora_A.weight"] = A.to(dtype).contiguous()
        out[f"{_PREFIX}{name}.lora_B.weight"] = B.to(dtype).contiguous()
    if problems:
        raise MergeError("cannot merge: " + "; ".join(problems[:8]))
    return _merged_config(inputs, new_rank), out


def module_order(base_dir: Path) -> list[str]:
    """The base model's module names in `named_modules` order (PEFT's merge order), from its
    config alone: the model is built on the meta device, no weights are read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_dir))
    return [name for name, _ in model.named_modules()]
