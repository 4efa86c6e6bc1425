"""The bf16 CPU 4-bit kernel's emulation (tests/bnb_cpu_kernel.py) against the native kernel,
and loradock's pin (registry/quantization.py) deciding which kernel a recipe runs."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from loradock.registry.quantization import QuantizationRecipe, pin_bitsandbytes_cpu_kernel

from tests.bnb_cpu_kernel import NATIVE, bf16_cpu_kernel, emulated_gemv_4bit

SHAPES = [(576, 1536), (1536, 576), (64, 32), (128, 64)]  # (in, out): SmolLM2's and the tiny base's


def linear4bit(n_in: int, n_out: int, compute: torch.dtype, seed: int = 0) -> bnb.nn.Linear4bit:
    g = torch.Generator().manual_seed(seed)
    layer = bnb.nn.Linear4bit(n_in, n_out, bias=False, compute_dtype=compute, quant_type="nf4",
                              compress_statistics=False)
    weight = torch.randn(n_out, n_in, generator=g) * 0.05
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4",
                                     compress_statistics=False)._quantize("cpu")
    return layer.eval()


@pytest.mark.skipif(not NATIVE, reason="needs a CPU with AVX512-BF16 (bitsandbytes' native kernel)")
@pytest.mark.parametrize(("n_in", "n_out"), SHAPES)
def test_the_emulation_is_the_native_kernel(n_in, n_out):
    layer = linear4bit(n_in, n_out, torch.bfloat16)
    x = torch.randn(37, n_in, generator=torch.Generator().manual_seed(1))  # > one 32-row tile
    with torch.inference_mode():
        native = layer(x)
    state = layer.weight.quant_state
    assert state.packing_format_for_cpu
    emulated = emulated_gemv_4bit(x, layer.weight.data, state).float()
    # The fp32 additions run in another order: an output whose total sits on a bf16 rounding
    # boundary may round the other way, by one bf16 step (measured: 0.005-0.01% of outputs).
    differ = native != emulated
    assert differ.float().mean() < 1e-3
    one_step = native.abs().clamp_min(2 ** -126) * 2 ** -7
    assert ((native - emulated).abs()[differ] <= one_step[differ]).all()


@pytest.mark.parametrize("emulate", sorted({True, not NATIVE}))
@pytest.mark.parametrize(("n_in", "n_out"), SHAPES)
def test_the_kernel_rounds_to_bf16_and_stays_within_its_rounding_of_fp32(n_in, n_out, emulate):
    """The mode the tests call the bf16 kernel: repacked weights, bf16 state, outputs on the bf16
    grid, within a few bf16 roundings of the float32 path's (not equal to it: it must differ)."""
    fp32 = linear4bit(n_in, n_out, torch.float32)
    pin_bitsandbytes_cpu_kernel(fp32, QuantizationRecipe.named("nf4", "float32"))
    x = torch.randn(5, n_in, generator=torch.Generator().manual_seed(2))
    with bf16_cpu_kernel(emulate), torch.inference_mode():
        layer = linear4bit(n_in, n_out, torch.bfloat16)
        got = layer(x)
        want = fp32(x)
    assert layer.weight.quant_state.packing_format_for_cpu
    assert layer.weight.quant_state.dtype == torch.bfloat16
    assert torch.equal(got, got.to(torch.bfloat16).float())
    # Inputs rounded to bf16 (relative 2^-9 each) and the output rounded once more.
    bound = 2 ** -8 * (x.abs() @ layer_weight_abs(fp32).T) + 2 ** -9 * want.abs() + 1e-6
    assert ((got - want).abs() <= bound).all()
    assert not torch.equal(got, want)


def layer_weight_abs(layer) -> torch.Tensor:
    return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).abs()


@pytest.mark.parametrize("emulate", sorted({True, not NATIVE}))
@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_the_pin_lets_only_a_bf16_recipe_take_the_kernel(compute, emulate):
    """On every CPU (emulated where it lacks AVX512-BF16), a float32 recipe computes in float32
    (bitsandbytes alone would repack it and compute in bf16) and training never repacks."""
    recipe = QuantizationRecipe.named("nf4", compute)
    x = torch.randn(3, 64)
    with bf16_cpu_kernel(emulate), torch.inference_mode():
        model = torch.nn.Sequential(linear4bit(64, 32, getattr(torch, compute)))
        model_for_training = torch.nn.Sequential(linear4bit(64, 32, getattr(torch, compute)))
        assert pin_bitsandbytes_cpu_kernel(model, recipe) == (compute == "bfloat16")
        assert not pin_bitsandbytes_cpu_kernel(model_for_training, recipe, training=True)
        model(x), model_for_training(x)
    assert getattr(model[0].weight.quant_state, "packing_format_for_cpu", False) == (compute == "bfloat16")
    assert not getattr(model_for_training[0].weight.quant_state, "packing_format_for_cpu", False)


def test_the_pin_keeps_layers_the_kernel_cannot_pack_off_it():
    with bf16_cpu_kernel():
        model = torch.nn.Sequential(linear4bit(64, 48, torch.bfloat16))  # 48 rows: not whole 32-row tiles
    assert pin_bitsandbytes_cpu_kernel(model, QuantizationRecipe.named("nf4", "bfloat16"))
    assert not model[0].support_avx512bf16_for_cpu
