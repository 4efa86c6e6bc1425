"""`LoadedAdapter`: one adapter version's LoRA weights as plain host tensors.

Read from the version directory's safetensors file (never pickle; through a reused staging
buffer, `host_memory.read_tensors`) and validated against the served model before a single
tensor is copied into a slot: all problems are collected into one AdapterUnavailableError.
The slot-layout tensors are carved out of one buffer lent by a `HostBlocks` pool, given back
by `LoadedAdapter.release` when the adapter cache drops the host copy.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from loradock.registry import peft_format
from loradock.registry.peft_format import CONFIG_FILE, WEIGHTS_FILE
from loradock.registry.safetensors_header import SafetensorsFormatError

from .errors import AdapterUnavailableError
from .host_memory import HostBlock, HostBlocks, read_tensors
from .types import ResolvedAdapter


@dataclass(frozen=True)
class ModuleLoRA:
    """One layer's LoRA in the engine's slot layout, prepared off the engine loop so that
    writing a slot is plain copies: out = base + x @ shrink.T @ expand (+ bias, DoRA scale)."""

    shrink: torch.Tensor  # [r, in] = scaling * lora_A
    expand: torch.Tensor  # [r, out] = lora_B^T
    scaling: float  # alpha / r, or alpha / sqrt(r) with rsLoRA (already in `shrink`)
    bias: torch.Tensor | None = None  # [out] = scaling * lora_B.bias (lora_bias=true)
    # [out] = magnitude / ||W + scaling * B @ A|| - 1 per output row (DoRA; 0 would be plain LoRA)
    dora_scale: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.shrink.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (self.shrink, self.expand, self.bias, self.dora_scale) if t is not None)


@dataclass(frozen=True)
class LoadedAdapter:
    """An adapter version's weights, keyed by the served model's module names."""

    adapter: ResolvedAdapter
    modules: dict[str, ModuleLoRA]
    block: HostBlock | None = None  # the pooled buffer the modules' shrink/expand are views of

    def release(self) -> None:
        """Give the pooled buffer back: the caller holds no other reference to these tensors."""
        if self.block is not None:
            self.block.release()

    @property
    def released(self) -> bool:
        return self.block is not None and self.block.released

    @property
    def max_rank(self) -> int:
        return max(m.rank for m in self.modules.values())

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.modules.values())


@dataclass(frozen=True)
class ServedModel:
    """What an adapter must fit: the served base's fingerprint and its targetable linears."""

    fingerprint: str
    linear_shapes: dict[str, tuple[int, int]]  # module name -> (in, out)
    max_rank: int
    # module name -> its base weight [out, in] as served (dequantized), float32: for DoRA
    base_weight: Callable[[str], torch.Tensor] | None = None


def dora_scale(magnitude: torch.Tensor, base_weight: torch.Tensor, shrink: torch.Tensor,
               lora_b: torch.Tensor) -> torch.Tensor:
    """DoRA's per-output factor minus one, from PEFT's DoraLinearLayer: magnitude [out] over the
    row norms of W + scaling * B @ A (W [out, in] as served; shrink [r, in] = scaling * A;
    lora_b [out, r]); all float32. Minus one so that plain LoRA is the zero vector."""
    norm = torch.linalg.norm(torch.addmm(base_weight, lora_b, shrink), dim=1)  # never in place: W is the base's
    return magnitude / norm - 1


def _module(name: str, spec: peft_format.LoraModule, tensors: dict[str, torch.Tensor], config: dict,
            served: ServedModel, shrink: torch.Tensor, expand: torch.Tensor) -> ModuleLoRA:
    """One layer's LoRA, from the staging views `tensors` into shrink [r, in] and expand [r, out]
    (views of the adapter's block); bias and DoRA scale are new tensors, so nothing refers to
    staging afterwards."""
    prefix = f"base_model.model.{name}."
    lora_a, lora_b = (tensors[prefix + part] for part in (peft_format.A, peft_format.B))
    scaling = peft_format.scaling(spec.alpha, spec.rank, bool(config.get("use_rslora")))
    # Scaled in float32 whatever the file's and the serving dtype, in one pass when both are.
    if lora_a.dtype == shrink.dtype == torch.float32:
        scaled_a = torch.mul(lora_a, scaling, out=shrink)
    else:
        scaled_a = lora_a.to(torch.float32) * scaling
        shrink.copy_(scaled_a)
    expand.copy_(lora_b.T)
    dtype = shrink.dtype
    bias = scale = None
    if spec.has_bias:
        bias = (tensors[prefix + peft_format.BIAS].to(torch.float32) * scaling).to(dtype)
    if spec.has_magnitude:
        magnitude = tensors[prefix + peft_format.MAGNITUDE].to(torch.float32)
        base = served.base_weight(name).to(torch.float32)  # where the model is (CUDA: computed there)
        on = base.device
        scale = dora_scale(magnitude.to(on), base, scaled_a.to(on), lora_b.to(on, torch.float32)).to(dtype)
    return ModuleLoRA(shrink=shrink, expand=expand, scaling=scaling, bias=bias, dora_scale=scale)


def _modules(specs: dict[str, peft_format.LoraModule], tensors: dict[str, torch.Tensor], config: dict,
             served: ServedModel, host: torch.Tensor) -> dict[str, ModuleLoRA]:
    """Every module, its shrink and expand carved out of `host` (1-D, `_layout_numel` long)."""
    modules, offset = {}, 0
    for name, spec in sorted(specs.items()):
        cut, end = offset + spec.rank * spec.in_features, offset + _layout_numel(spec)
        modules[name] = _module(name, spec, tensors, config, served,
                                host[offset:cut].view(spec.rank, spec.in_features),
                                host[cut:end].view(spec.rank, spec.out_features))
        offset = end
    return modules


def _layout_numel(spec: peft_format.LoraModule) -> int:
    return spec.rank * (spec.in_features + spec.out_features)


def largest_layout_numel(served: ServedModel) -> int:
    """Elements of the largest adapter `served` takes (every linear at max rank), in the slot layout."""
    return served.max_rank * sum(i + o for i, o in served.linear_shapes.values())


def read_adapter(adapter: ResolvedAdapter, version_dir: Path, manifest: dict, served: ServedModel,
                 dtype: torch.dtype = torch.float32, blocks: HostBlocks | None = None) -> LoadedAdapter:
    """Read and validate an adapter version; raise AdapterUnavailableError listing every problem.

    The PEFT format rules are the registry's (`peft_format`); here only the fit to the served
    base and the engine's limits are checked."""
    version_dir = Path(version_dir)
    where = f"adapter {adapter.ref}"
    base_fp = (manifest.get("base") or {}).get("fingerprint")
    if base_fp and base_fp != served.fingerprint:
        base_name = (manifest.get("base") or {}).get("name", "?")
        raise AdapterUnavailableError(
            f"{where} was trained for base {base_name!r} (fingerprint {str(base_fp)[:12]}), "
            f"but this engine serves fingerprint {served.fingerprint[:12]}"
        )
    try:
        config = json.loads((version_dir / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterUnavailableError(f"{where}: cannot read {CONFIG_FILE}: {e}") from e
    problems = peft_format.config_problems(config)
    if problems:
        raise AdapterUnavailableError(f"{where}: " + "; ".join(problems))

    if blocks is None:
        blocks = HostBlocks(keep_bytes=0)  # nothing to reuse: every buffer is new
    try:
        with read_tensors(version_dir / WEIGHTS_FILE, blocks) as tensors:  # staging: valid in here only
            return _from_tensors(adapter, tensors, config, served, dtype, blocks)
    except (OSError, SafetensorsFormatError) as e:  # only reading raises these
        raise AdapterUnavailableError(f"{where}: cannot read {WEIGHTS_FILE}: {e}") from e


def _from_tensors(adapter: ResolvedAdapter, tensors: dict[str, torch.Tensor], config: dict,
                  served: ServedModel, dtype: torch.dtype, blocks: HostBlocks) -> LoadedAdapter:
    """Check the file's modules against the served base, then convert them into a block."""
    where = f"adapter {adapter.ref}"
    problems, specs = peft_format.read_modules({k: list(t.shape) for k, t in tensors.items()}, config)
    problems += peft_format.serving_problems(config, specs)
    for name, spec in specs.items():
        if name not in served.linear_shapes:
            problems.append(f"{name}: no such targetable linear layer in the served base")
        elif served.linear_shapes[name] != (spec.in_features, spec.out_features):
            in_f, out_f = served.linear_shapes[name]
            problems.append(f"{name}: LoRA maps {spec.in_features}->{spec.out_features} features; "
                            f"the served layer's weights do not fit it ({in_f}->{out_f})")
        elif spec.rank > served.max_rank:
            problems.append(f"{name}: rank {spec.rank} exceeds the engine's max_rank {served.max_rank}")
        elif spec.has_magnitude and served.base_weight is None:
            problems.append(f"{name}: DoRA needs the served base weights, which this engine does not expose")
    if problems:
        shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
        raise AdapterUnavailableError(f"{where} cannot be served: " + "; ".join(shown))
    nbytes = sum(_layout_numel(spec) for spec in specs.values()) * dtype.itemsize
    block = blocks.take(nbytes)
    try:
        return LoadedAdapter(adapter, _modules(specs, tensors, config, served, block.tensor[:nbytes].view(dtype)), block)
    except BaseException:
        block.release()
        raise
