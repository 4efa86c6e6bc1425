"""int4 weight-only serving (`quantize="int4"`, runtime/int4.py): the layer is the group-wise
arithmetic it claims, on tinygemm's CPU kernel and emulated, and an engine serving mixed batches
on it equals PEFT over the same 4-bit base, written here independently as plain arithmetic on
nn.Linear layers PEFT wraps as it always does."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from loradock.registry.quantization import QuantizationRecipe
from loradock.runtime.int4 import Int4Linear, check_int4_matmul, quantize_groups
from torch import nn

from tests.runtime.test_oracle import ATOL, PROMPTS, check_against_peft
from tests.runtime.test_oracle_variants import (  # noqa: F401 (fixtures)
    NAMES,
    assert_variants_active,
    variant_adapter_dirs,
    variant_registry,
)

BF16 = torch.bfloat16


def through_int4(w: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """w rounded through 4-bit groups of `group` inputs, as the module docstring states it (the
    scale and zero of each group rounded through `dtype`), in float32."""
    rows, k = w.shape
    g = w.detach().float().view(rows, k // group, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((hi - lo).clamp(min=1e-6) / 15).to(dtype).float()
    zero = (lo + 8 * scale).to(dtype).float()
    q = ((g - (zero - 8 * scale)) / scale).round().clamp(0, 15)
    return ((q - 8) * scale + zero).view(rows, k)


class FakeInt4Linear(nn.Linear):
    """The oracle's int4 layer: an nn.Linear holding the weight rounded through 4-bit groups; the
    activations rounded to `compute`, the product in float32, rounded to `compute`, returned in
    the activations' dtype."""

    compute = torch.float32

    @classmethod
    def of(cls, linear: nn.Linear, compute: torch.dtype) -> FakeInt4Linear:
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        group = next(g for g in (128, 64, 32) if linear.in_features % g == 0)
        with torch.no_grad():
            layer.weight.copy_(through_int4(linear.weight, group, compute))
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        layer.compute = compute
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.to(self.compute).float(), self.weight).to(self.compute).to(x.dtype)
        return y if self.bias is None else y + self.bias


def random_linear(k: int, n: int, seed: int = 0) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(k, n)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=g))
        linear.weight[3] = 0.5  # constant groups keep a finite scale
        linear.bias.copy_(torch.randn(n, generator=g))
    return linear


def test_the_spec_rounds_each_group_to_16_levels_of_its_range():
    w = random_linear(256, 16).weight
    q, scales, zeros = quantize_groups(w, 128, torch.float32)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and scales.shape == zeros.shape == (16, 2)
    layer = Int4Linear(random_linear(256, 16), torch.float32, emulated="spec")
    back = layer.dequantized_weight()
    torch.testing.assert_close(back, through_int4(w, 128, torch.float32))
    err = (back - w).abs().view(16, 2, 128).amax(-1)
    assert torch.all(err <= scales / 2 + 1e-6), "each weight within half a step of its group's grid"
    assert torch.all(back[3] == 0.5)
    assert len(torch.unique(back[0, :128])) <= 16


@pytest.mark.parametrize(("k", "n"), [(64, 48), (576, 1536), (128, 32)])
def test_the_cpu_kernel_is_the_spec_in_bfloat16(k, n):
    """tinygemm's CPU kernel (`torch._weight_int4pack_mm_for_cpu`) computes what the spec says,
    within bf16 rounding, for the group sizes loradock picks (64 for SmolLM2's 576 inputs)."""
    linear = random_linear(k, n)
    served = Int4Linear(linear, BF16)
    assert served.emulated is None and hasattr(served, "packed") and served.packed.dtype == torch.uint8
    x = torch.randn(2, 7, k, generator=torch.Generator().manual_seed(1))
    got = served(x)
    assert got.dtype == torch.float32 and got.shape == (2, 7, n)
    want = FakeInt4Linear.of(linear, BF16)(x)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    # what DoRA's norms are taken of: the packed weight read back through the kernel, exact
    assert torch.equal(served.dequantized_weight(), through_int4(linear.weight, served.group, BF16))
    assert 0 < (got - linear(x)).abs().max() < 0.2 * want.abs().max(), "int4's rounding, and no more"


def test_the_kernel_serves_bfloat16_and_explains_everything_else():
    assert check_int4_matmul(torch.device("cpu"), BF16) is None
    why = check_int4_matmul(torch.device("cpu"), torch.float32)
    assert "bfloat16" in why and "float32" in why
    with pytest.raises(ValueError, match="divisible by 32"):
        Int4Linear(nn.Linear(100, 64), BF16)


@pytest.mark.parametrize(("k", "n", "tiles"), [(4096, 14336, 8), (576, 1536, 4), (32, 8, 2)])
def test_the_cuda_packing_has_the_shapes_the_cuda_kernel_takes(k, n, tiles):
    """Checked on meta tensors with torch's own shape rule for the CUDA packing (the kernel runs
    at start on a GPU, against the spec): nibbles [n, k / 2] in, the tiled int32 layout out."""
    from loradock.runtime.int4 import inner_k_tiles, pack_for_kernel

    assert inner_k_tiles(k) == tiles
    packed = pack_for_kernel(torch.zeros(n, k, dtype=torch.uint8, device="meta"))
    assert packed.shape == (n // 8, k // (tiles * 16), 32, tiles // 2) and packed.dtype == torch.int32


def test_int4_is_a_serving_recipe():
    recipe = QuantizationRecipe.named("int4", "bfloat16")
    assert (recipe.method, recipe.quant_type, recipe.quantized, recipe.bnb_kwargs()) == \
        ("int4-weight-only", "int4", True, None)
    assert QuantizationRecipe.from_json(recipe.to_json()) == recipe


def int4_oracle(base_path, adapters: dict, compute: torch.dtype):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
    head = base.get_output_embeddings()
    for name, module in list(base.named_modules()):
        if isinstance(module, nn.Linear) and module is not head:
            parent, _, child = name.rpartition(".")
            setattr(base.get_submodule(parent), child, FakeInt4Linear.of(module, compute))
    names = list(adapters)
    model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    return model.eval()


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_an_int4_engine_matches_peft_over_the_same_4bit_base(variant_registry, tiny_base,  # noqa: F811
                                                             variant_adapter_dirs, engine_factory,  # noqa: F811
                                                             compute):
    """Mixed batches on int4 layers: DoRA (its norms of the 4-bit weight), a LoRA bias, plain
    adapters and the base side by side; each request's logits equal PEFT's over the same 4-bit
    base with its adapter alone, prefill and decode, and greedy tokens match. float32 compute is
    emulated and exact; bfloat16 runs tinygemm's CPU kernel and is held within bf16's noise."""
    engine = engine_factory(variant_registry, tiny_base.name, run_loop=False, quantize="int4", compute_dtype=compute)
    kernel = compute == "bfloat16"
    assert engine.info().quantization == "int4" if kernel else engine.info().quantization.startswith(
        "int4 (emulated: the int4 kernels compute in bfloat16")
    assert all(isinstance(layer.base_layer, Int4Linear) and (layer.base_layer.emulated is None) == kernel
               for layer in engine.layers.values())
    oracle = int4_oracle(tiny_base.path, variant_adapter_dirs, getattr(torch, compute))
    check_against_peft(engine, oracle, NAMES, PROMPTS[:len(NAMES)], None if kernel else ATOL["none"],
                       new_tokens=4, fp32=not kernel)
    assert_variants_active(engine)
