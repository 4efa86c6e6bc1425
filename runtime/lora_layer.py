"""`MultiLoRALinear`: a base linear layer (plain, 4-bit or 8-bit) plus stacked LoRA slots.

The layer owns preallocated buffers shrink [slots, r_max, in] (PEFT's lora_A, scaling
folded in) and expand [slots, r_max, out] (lora_B transposed); slot 0 means
"no adapter" and stays zero. Writing an adapter into a slot zero-pads its rank to
r_max, so every op is a plain x @ shrink.T @ expand. Which token uses which slot
comes from the step's batch context.

Two more per-slot buffers, [slots, out] each, zero for plain LoRA and slot 0: LoRA biases
(scaling * lora_B.bias) and DoRA's per-output scale minus one, both applied after the op by
`lora_ops.apply_bias_and_dora`, only in steps where a slot present uses them.

A static step (a captured CUDA graph, `cuda_graphs.py`) skips none of that: the graph is
replayed for whatever adapters the next steps bring, so it runs the static op over every slot
and always applies the bias/DoRA rows (zero where unused); on CUDA that is two Triton launches
per layer, the second adding delta and rows into the base output as it stores, and the layers
that read one input (`InputGroup`: q/k/v, gate/up) share one shrink launch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence

import torch
from loradock.registry.peft_format import HEAD_AND_EMBEDDINGS
from torch import nn

from .batch_context import LoRABatch, current_context
from .lora_ops import (
    LoRAOp,
    apply_bias_and_dora,
    gathered_static_lora,
    pick_op,
    pick_static_op,
    torch_twin,
    uses_triton,
)
from .quantized_linear import QuantizedLinear
from .triton_lora import grouped_shrink, triton_expand_into, triton_lora_into

# Sibling layers that read the same input in the families served (an attention's, an MLP's).
SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))

log = logging.getLogger(__name__)


def linear_shape(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of nn.Linear, bnb Linear4bit or Linear8bitLt, or a QuantizedLinear."""
    return int(layer.in_features), int(layer.out_features)


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The weight [out, in] a plain, 4-bit or 8-bit bitsandbytes linear or a QuantizedLinear computes
    with, float32 (what PEFT's DoRA norms are taken of: peft.utils.integrations.dequantize_module_weight)."""
    if isinstance(layer, QuantizedLinear):
        return layer.dequantized_weight()
    weight = layer.weight
    kind = type(weight).__name__
    if kind == "Params4bit":
        from bitsandbytes.functional import dequantize_4bit

        weight = dequantize_4bit(weight.data, weight.quant_state)
    elif kind == "Int8Params":
        from bitsandbytes.functional import int8_vectorwise_dequant

        scb = weight.SCB if weight.SCB is not None else layer.state.SCB
        weight = int8_vectorwise_dequant(weight.data, scb.to(weight.device))
    return weight.detach().to(torch.float32)


class MultiLoRALinear(nn.Module):
    def __init__(self, base_layer: nn.Module, num_slots: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device, op: LoRAOp) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_shape(base_layer)
        self.op = op
        self.static_op = pick_static_op(device)
        # Rank slicing saves arithmetic on CPU. A CUDA step is launch-bound, and full-rank
        # operands keep the Triton kernels to the specializations compiled at start (Triton
        # compiles anew for int arguments of another divisibility class, e.g. rank 8 vs 16).
        self.slice_ranks = device.type != "cuda"
        self.register_buffer("lora_shrink", torch.zeros(num_slots, max_rank, self.in_features, dtype=dtype,
                                                        device=device), persistent=False)
        self.register_buffer("lora_expand", torch.zeros(num_slots, max_rank, self.out_features, dtype=dtype,
                                                        device=device), persistent=False)
        for name in ("lora_bias", "lora_dora_scale"):  # [slots, out]: zero = plain LoRA
            self.register_buffer(name, torch.zeros(num_slots, self.out_features, dtype=dtype, device=device),
                                 persistent=False)
        self.ranks = [0] * num_slots  # rank of the adapter in each slot here (0: none)
        # The same on the device, for the Triton kernels (a captured graph reads it as it is).
        self.register_buffer("slot_ranks", torch.zeros(num_slots, dtype=torch.int32, device=device),
                             persistent=False)
        # Rows of each slot that may be non-zero (every row from there on is zero): a load
        # zeroes only what an earlier, larger adapter left, not the whole rank padding.
        self.written = [0] * num_slots
        # Slots whose adapter has a LoRA bias / is DoRA here: usually none, so the check per step
        # is one empty-set test, not a loop over the step's slots.
        self.bias_slots: set[int] = set()
        self.dora_slots: set[int] = set()
        self.group: InputGroup | None = None  # the layers reading this one's input, if any
        self.boundary_index = -1  # its place in the model's wrapped layers: how compiled graphs name it

    def set_slot(self, slot: int, shrink: torch.Tensor | None, expand: torch.Tensor | None,
                 bias: torch.Tensor | None = None, dora_scale: torch.Tensor | None = None) -> None:
        """Write an adapter's shrink [r, in] (scaling * lora_A), expand [r, out] (lora_B^T) and,
        when it has them, bias [out] (scaling * lora_B.bias) and dora_scale [out] (DoRA's
        magnitude / weight norm - 1) into `slot`; shrink None clears the slot."""
        if slot == 0:
            raise ValueError("slot 0 is reserved for requests without an adapter")
        r = 0 if shrink is None or expand is None else shrink.shape[0]
        extras = [t for t in (bias, dora_scale) if t is not None and r]
        if r and (shrink.shape != (r, self.in_features) or expand.shape != (r, self.out_features)
                  or any(t.shape != (self.out_features,) for t in extras)):
            raise ValueError(  # before any write: a refused adapter leaves the slot as it was
                f"LoRA shapes shrink{tuple(shrink.shape)} expand{tuple(expand.shape)} "
                f"{' '.join(str(tuple(t.shape)) for t in extras)} do not fit a "
                f"{self.in_features}->{self.out_features} layer"
            )
        self.ranks[slot] = 0
        had_bias, had_dora = slot in self.bias_slots, slot in self.dora_slots
        self.bias_slots.discard(slot)
        self.dora_slots.discard(slot)
        written = self.written[slot]
        self.written[slot] = max(written, r)  # until the writes below are done
        if r:
            self.lora_shrink[slot, :r] = shrink
            self.lora_expand[slot, :r] = expand
        if written > r:  # rows of a larger adapter before (or the whole slot when clearing)
            self.lora_shrink[slot, r:written] = 0
            self.lora_expand[slot, r:written] = 0
        self.written[slot] = r
        # Rows stay zero while the slot's adapters have none: no write on a plain adapter's load.
        if bias is not None and r:
            self.lora_bias[slot] = bias
        elif had_bias:
            self.lora_bias[slot] = 0
        if dora_scale is not None and r:
            self.lora_dora_scale[slot] = dora_scale
        elif had_dora:
            self.lora_dora_scale[slot] = 0
        self.ranks[slot] = r
        self.slot_ranks[slot] = r
        if r and bias is not None:
            self.bias_slots.add(slot)
        if r and dora_scale is not None:
            self.dora_slots.add(slot)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # the compiler sees one opaque op (compiled.py)
            return torch.ops.loradock.lora_linear(x, self.boundary_index)
        return self.step_forward(x)

    def step_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer plus each token's adapter delta, from the step's batch context."""
        result = self.base_layer(x)
        ctx = current_context()
        if ctx is None:
            return result
        if ctx.lora.static:
            return self._static_forward(x, result, ctx.lora)
        slots = [s for s in ctx.lora.slots_present if self.ranks[s]]
        if not slots:
            return result
        # Ranks beyond the largest one present are zero padding: leave them out of the maths.
        # (Each op skipped here is a kernel launch less per layer on a GPU.)
        r = max(self.ranks[s] for s in slots)
        shrink, expand = self.lora_shrink, self.lora_expand
        if r < shrink.shape[1] and self.slice_ranks:
            shrink, expand = shrink[:, :r], expand[:, :r]
        flat = x.reshape(-1, self.in_features)  # [T, in]
        if flat.dtype != shrink.dtype:
            flat = flat.to(shrink.dtype)
        delta = self.op(flat, shrink, expand, ctx.lora, slots, self.slot_ranks).view(result.shape)  # [T, out]
        out = result.add_(delta) if delta.dtype == result.dtype else result + delta.to(result.dtype)
        bias = self.lora_bias if self.bias_slots and not self.bias_slots.isdisjoint(slots) else None
        dora = self.lora_dora_scale if self.dora_slots and not self.dora_slots.isdisjoint(slots) else None
        if bias is not None or dora is not None:
            out = apply_bias_and_dora(out.reshape(-1, self.out_features), ctx.lora.token_slots, bias, dora,
                                      getattr(self.base_layer, "bias", None)).reshape(result.shape)
        return out

    def _static_forward(self, x: torch.Tensor, result: torch.Tensor, batch: LoRABatch) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(self.lora_shrink.dtype)
        if self.group is not None and self.static_op is triton_lora_into:
            h = self.group.shrunk(self, x, flat, batch)
            out = triton_expand_into(result.view(-1, self.out_features), h, self.lora_expand, batch, self.lora_bias,
                                     self.lora_dora_scale, getattr(self.base_layer, "bias", None), self.slot_ranks)
            return out.view(result.shape)
        out = self.static_op(result.view(-1, self.out_features), flat, self.lora_shrink, self.lora_expand, batch,
                             self.lora_bias, self.lora_dora_scale, getattr(self.base_layer, "bias", None),
                             self.slot_ranks)
        return out.view(result.shape)

    def dequantized_weight(self) -> torch.Tensor:
        """The base layer's weight [out, in] as served, float32 (for DoRA's norms)."""
        return dequantized_weight(self.base_layer)


def boundary_layer(index: int) -> MultiLoRALinear:
    """The wrapped layer `index` of the model the running step is for."""
    ctx = current_context()
    if ctx is None or not 0 <= index < len(ctx.lora_layers):
        raise RuntimeError(f"compiled LoRA layer {index} ran outside a loradock step of its model")
    return ctx.lora_layers[index]


@torch.library.custom_op("loradock::lora_linear", mutates_args=())
def lora_linear(x: torch.Tensor, boundary_index: int) -> torch.Tensor:
    """A MultiLoRALinear's step as one op the compiler does not look into: the base layer
    (plain, 4-bit, 8-bit) and the adapters' deltas read per step from the batch context, which
    a graph cannot hold (the compile boundary of the compiled model path, `compiled.py`). The
    layer is named by its place in the model, so equal models compile to equal graphs (one
    cache entry on disk for every start)."""
    return boundary_layer(boundary_index).step_forward(x)


@lora_linear.register_fake
def _(x: torch.Tensor, boundary_index: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], boundary_layer(boundary_index).out_features)


class InputGroup:
    """Layers that read one input (an attention's q/k/v, an MLP's gate/up) in a captured step
    on CUDA: the first of them to see a new input makes every member's shrink in one launch
    (`grouped_shrink`), the others take theirs, so q/k/v cost one shrink launch, not three. A
    member called with another input (a family that feeds them apart) starts over: correct,
    just not shared."""

    def __init__(self, members: Sequence[MultiLoRALinear]) -> None:
        self.members = tuple(members)
        self._input: torch.Tensor | None = None
        self._pending: dict[int, torch.Tensor] = {}  # id(member) -> its shrink of _input

    def shrunk(self, layer: MultiLoRALinear, x: torch.Tensor, flat: torch.Tensor, batch: LoRABatch) -> torch.Tensor:
        """`layer`'s shrink of x [T, r] (x: the layer's own input, compared by identity)."""
        if x is not self._input or id(layer) not in self._pending:
            hs = grouped_shrink(flat, [m.lora_shrink for m in self.members], batch,
                                [m.slot_ranks for m in self.members])
            self._input, self._pending = x, {id(m): h for m, h in zip(self.members, hs, strict=True)}
        h = self._pending.pop(id(layer))
        if not self._pending:
            self._input = None  # every member served: hold nothing between steps
        return h


def lora_targets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers that take LoRA: every linear layer but the output head (bitsandbytes' 4-bit and
    8-bit layers are linear layers too, and loradock's fp8 and int4 layers); MoE experts' fused weights are
    no linear layers."""
    head = model.get_output_embeddings()
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, QuantizedLinear)) and module is not head
            and name.rsplit(".", 1)[-1] not in HEAD_AND_EMBEDDINGS]


def wrap_linears(model: nn.Module, num_slots: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device, ops: str) -> dict[str, MultiLoRALinear]:
    """Replace every linear layer of `model` but its output head (fused projections included) by a
    MultiLoRALinear; {module name: wrapper}."""
    op = pick_op(ops, device)
    wrapped: dict[str, MultiLoRALinear] = {}
    for name, module in lora_targets(model):
        wrapped[name] = MultiLoRALinear(module, num_slots, max_rank, dtype, device, op)
        model.set_submodule(name, wrapped[name])
    for index, (_, wrapper) in enumerate(iter_wrapped(model)):
        wrapper.boundary_index = index  # model_runner's BatchContext.lora_layers holds them in this order
    group_shared_inputs(wrapped)
    return wrapped


def group_shared_inputs(wrapped: dict[str, MultiLoRALinear]) -> None:
    """Give the sibling layers that read one input (SHARED_INPUTS, under one parent, one input
    width) an `InputGroup`."""
    parents = {name.rpartition(".")[0] for name in wrapped}
    for parent in parents:
        prefix = f"{parent}." if parent else ""
        for names in SHARED_INPUTS:
            members = [wrapped[prefix + n] for n in names if prefix + n in wrapped]
            if len(members) > 1 and len({m.in_features for m in members}) == 1:
                group = InputGroup(members)
                for member in members:
                    member.group = group


def warm_up_ops(layers: Iterable[MultiLoRALinear], batch: LoRABatch) -> None:
    """Run the op of each distinct layer shape once on `batch` (zeros in, result dropped; the
    static op for a static batch), so that kernels compiled on first use (Triton's, specialized
    on shapes and strides) compile at start rather than in a request's first step with adapters."""
    seen: set[tuple[int, int, torch.dtype]] = set()
    for layer in layers:
        key = (layer.in_features, layer.out_features, layer.lora_shrink.dtype)
        if key not in seen:
            seen.add(key)
            x = layer.lora_shrink.new_zeros(batch.token_slots.shape[0], layer.in_features)
            if batch.static:
                layer._static_forward(x, x.new_zeros(x.shape[0], layer.out_features), batch)
            else:
                layer.op(x, layer.lora_shrink, layer.lora_expand, batch, batch.slots_present, layer.slot_ranks)


def use_torch_ops(layers: Iterable[MultiLoRALinear], static_only: bool = False) -> None:
    """Serve `layers` with plain-torch ops where their Triton kernels cannot run: the static op
    of captured steps, and unless `static_only` the eager op too."""
    for layer in layers:
        if not static_only:
            layer.op = torch_twin(layer.op)
        layer.static_op = gathered_static_lora


def prepare_kernels(layers: Sequence[MultiLoRALinear], prompt_batch: LoRABatch, static_batch: LoRABatch,
                    by_name: bool) -> str | None:
    """At start, compile the Triton kernels of the layers' ops (`warm_up_ops` on a prompt
    chunk's batch, then on a captured step's), so none compiles in a request's step. Where they
    cannot run (Triton without a C compiler for its launcher, a release the kernels do not
    support), switch to the torch ops, logged, and return what was replaced; with `by_name`
    (lora_ops="triton" asked for them) raise ValueError instead. Where only the fused store of
    captured steps fails, those steps take the torch static op and stay captured."""
    if not any(uses_triton(layer.op) for layer in layers):
        return None
    try:
        warm_up_ops(layers, prompt_batch)
    except Exception as e:
        why = f"{type(e).__name__}: {e}"
        if by_name:
            raise ValueError(f"lora_ops='triton': the Triton kernels failed at start ({why}); "
                             "use lora_ops='auto' to serve with the torch ops") from e
        log.warning("the Triton LoRA kernels failed at start (%s); serving with the torch ops", why)
        use_torch_ops(layers)
        return "torch ops: Triton failed at start"
    if any(uses_triton(layer.static_op) for layer in layers):
        try:
            warm_up_ops(layers, static_batch)
        except Exception as e:
            log.warning("the fused Triton store of captured decode steps failed at start (%s: %s); "
                        "they use the torch static op", type(e).__name__, e)
            use_torch_ops(layers, static_only=True)
            return "torch op in captured steps: the fused Triton store failed at start"
    return None


def iter_wrapped(model: nn.Module) -> Iterator[tuple[str, MultiLoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, MultiLoRALinear):
            yield name, module
