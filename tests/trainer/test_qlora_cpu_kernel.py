"""QLoRA training on CPUs with AVX512-BF16 (emulated on others): an evaluation pass must not
switch the 4-bit base to bitsandbytes' bf16 kernel, which has no backward."""

from __future__ import annotations

import torch
from bitsandbytes.nn import Linear4bit
from loradock.registry.quantization import QuantizationRecipe
from loradock.trainer.model import load_base

from tests.bnb_cpu_kernel import bf16_cpu_kernel


def test_training_after_an_evaluation_pass_still_reaches_the_inputs(tiny_base):
    torch.manual_seed(0)
    with bf16_cpu_kernel():
        model = load_base(tiny_base.path, QuantizationRecipe.named("nf4", "float32"), torch.device("cpu"))
        ids = torch.tensor([[5, 17, 300, 42]])
        model.eval()
        with torch.no_grad():  # the trainer's validation loss
            model(input_ids=ids)
        model.train()
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
        model(inputs_embeds=embeds).logits.square().mean().backward()
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert layers and not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
