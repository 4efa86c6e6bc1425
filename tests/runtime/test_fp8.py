"""FP8 serving (`quantize="fp8"`, runtime/fp8.py): the layer is the W8A8 arithmetic it claims,
and an engine serving mixed batches on it equals PEFT over the same W8A8 base, written here
independently as plain float32 arithmetic on nn.Linear layers PEFT wraps as it always does."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from loradock.registry.quantization import QuantizationRecipe
from loradock.runtime.fp8 import FP8Linear, check_fp8_matmul, emulated_fp8_linear
from torch import nn

from tests.runtime.test_oracle import ATOL, PROMPTS, check_against_peft
from tests.runtime.test_oracle_variants import (  # noqa: F401 (fixtures)
    NAMES,
    assert_variants_active,
    variant_adapter_dirs,
    variant_registry,
)

E4M3 = torch.float8_e4m3fn


def through_fp8(t: torch.Tensor) -> torch.Tensor:
    """t rounded through float8 e4m3 with a scale per row (its largest |value| to 448), in float32."""
    scale = (t.abs().amax(dim=-1, keepdim=True).float() / 448).clamp(min=1e-12)
    return (t.float() / scale).clamp(-448, 448).to(E4M3).float() * scale


class FakeFP8Linear(nn.Linear):
    """The oracle's W8A8 layer: an nn.Linear holding the weight rounded through float8, rounding
    each token's activations the same way before a float32 matmul."""

    @classmethod
    def of(cls, linear: nn.Linear) -> FakeFP8Linear:
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        with torch.no_grad():
            layer.weight.copy_(through_fp8(linear.weight))
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(through_fp8(x), self.weight, self.bias)


def test_the_fp8_layer_is_w8a8_with_row_scales():
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(64, 48)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 64, generator=g))
        linear.weight[3] = 0  # an all-zero row keeps a finite scale
    layer = FP8Linear(linear)
    assert layer.qweight.dtype == E4M3 and layer.weight_scale.shape == (48, 1)
    x = torch.randn(2, 5, 64, generator=g)
    x[0, 1] = 0
    got = layer(x)
    want = FakeFP8Linear.of(linear)(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(emulated_fp8_linear(x.view(-1, 64), layer.qweight, layer.weight_scale, layer.bias),
                               want.view(-1, 48), rtol=1e-5, atol=1e-5)
    exact = linear(x)
    assert 0 < (got - exact).abs().max() < 0.1 * exact.abs().max(), "fp8's rounding, and no more"
    assert torch.all(got[..., 3] == linear.bias[3])
    torch.testing.assert_close(layer.dequantized_weight(), FakeFP8Linear.of(linear).weight)
    assert check_fp8_matmul(torch.device("cpu"), torch.float32) is None


def test_fp8_is_a_serving_recipe():
    recipe = QuantizationRecipe.named("fp8", "bfloat16")
    assert (recipe.method, recipe.quant_type, recipe.quantized, recipe.bnb_kwargs()) == \
        ("fp8-dynamic", "float8_e4m3fn", True, None)
    assert QuantizationRecipe.from_json(recipe.to_json()) == recipe


def fp8_oracle(base_path, adapters: dict):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
    head = base.get_output_embeddings()
    for name, module in list(base.named_modules()):
        if isinstance(module, nn.Linear) and module is not head:
            parent, _, child = name.rpartition(".")
            setattr(base.get_submodule(parent), child, FakeFP8Linear.of(module))
    names = list(adapters)
    model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    return model.eval()


def test_an_fp8_engine_matches_peft_over_the_same_w8a8_base(variant_registry, tiny_base,  # noqa: F811
                                                            variant_adapter_dirs, engine_factory):  # noqa: F811
    """Mixed batches on fp8 layers (torch._scaled_mm's CPU kernel here): DoRA (its norms of the
    float8 weight), a LoRA bias, plain adapters and the base side by side; each request's logits
    equal PEFT's over the W8A8 base with its adapter alone, prefill and decode, and greedy
    tokens match."""
    engine = engine_factory(variant_registry, tiny_base.name, run_loop=False, quantize="fp8")
    assert engine.info().quantization == "fp8"
    assert all(isinstance(layer.base_layer, FP8Linear) for layer in engine.layers.values())
    oracle = fp8_oracle(tiny_base.path, variant_adapter_dirs)
    # Not held to PEFT's full forward as well (fp32=False): an activation on a float8 rounding
    # boundary may round apart when the sum before it is taken in another order (1e-5 seen).
    check_against_peft(engine, oracle, NAMES, PROMPTS[:len(NAMES)], ATOL["none"], new_tokens=4, fp32=False)
    assert_variants_active(engine)
