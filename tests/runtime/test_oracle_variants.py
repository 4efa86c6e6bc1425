"""DoRA and LoRA biases in mixed batches: each request equals PeftModel with its adapter alone
(prefill and decode), next to plain adapters and the base, for every op and fp32 / NF4 bases."""

from __future__ import annotations

import pytest
import torch
from loradock.runtime import GenerationRequest, SamplingParams
from loradock.runtime.cuda_graphs import StepGraphs

from tests.runtime.conftest import ATTN_MLP, Spec, load_peft_oracle, make_adapters, oracle_greedy
from tests.runtime.test_oracle import ATOL, PROMPTS, assert_served_nf4, check_against_peft

VARIANTS = (Spec("dora", 8, ATTN_MLP, 11, use_dora=True), Spec("lbias", 8, ATTN_MLP, 12, lora_bias=True))
PLAIN = ("law", "chem")  # from SPECS: rank 4 attention-only and rank 16 attention + MLP
NAMES = ["dora", "lbias", "law", None, "chem", "dora"]


@pytest.fixture(scope="session")
def variant_adapter_dirs(tiny_base, tiny_adapter_dirs, tmp_path_factory):
    dirs = make_adapters(tiny_base, tmp_path_factory.mktemp("variant-adapters"), VARIANTS)
    return {**dirs, **{name: tiny_adapter_dirs[name] for name in PLAIN}}


@pytest.fixture
def variant_registry(registry, tiny_base, variant_adapter_dirs):
    for name, path in variant_adapter_dirs.items():
        registry.publish(path, name, base=tiny_base.name)
    return registry


def assert_variants_active(engine) -> None:
    """The test can fail: the DoRA scale and the LoRA bias really are in the slots (non-zero), and
    only in those adapters' slots."""
    slots = {name: engine.cache.slot_of(engine.load_adapter(name)) for name in ("dora", "lbias", "law")}
    layer = engine.layers["model.layers.0.mlp.down_proj"]
    assert layer.lora_dora_scale[slots["dora"]].abs().max() > 1e-2
    assert layer.lora_bias[slots["lbias"]].abs().max() > 1e-2
    assert layer.lora_dora_scale[slots["lbias"]].abs().max() == 0 == layer.lora_bias[slots["dora"]].abs().max()
    assert layer.lora_bias[slots["law"]].abs().max() == 0 == layer.lora_dora_scale[slots["law"]].abs().max()


@pytest.mark.parametrize(("quantize", "ops"), [
    ("none", "auto"), ("nf4", "auto"), ("none", "reference"), ("none", "segmented"), ("none", "batched"),
])
def test_dora_and_lora_bias_match_peft_in_mixed_batches(variant_registry, tiny_base, variant_adapter_dirs,
                                                         engine_factory, quantize, ops):
    engine = engine_factory(variant_registry, tiny_base.name, run_loop=False, quantize=quantize, lora_ops=ops)
    if quantize == "nf4":
        assert_served_nf4(engine)
    assert_variants_active(engine)
    oracle = load_peft_oracle(tiny_base.path, variant_adapter_dirs, quantize)
    check_against_peft(engine, oracle, NAMES, PROMPTS[:len(NAMES)], ATOL[quantize], new_tokens=4,
                       fp32=quantize == "none")


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_static_decode_steps_match_peft(variant_registry, tiny_base, variant_adapter_dirs, engine_factory,
                                        quantize):
    """Decode steps through the static forward that CUDA graphs capture (run eagerly here): every
    slot at full rank, bias/DoRA rows always applied, 6 sequences padded to a batch of 8, the
    context padded to its bucket. Each request still equals PEFT with its adapter alone. (CUDA's
    static op, the Triton kernels, is checked against PEFT one layer at a time in
    test_every_op_serves_dora_and_bias_with_a_base_bias below: under Triton's interpreter this
    whole engine run would take a minute.)"""
    engine = engine_factory(variant_registry, tiny_base.name, run_loop=False, quantize=quantize)
    graphs = StepGraphs(engine.runner.model, engine.kv, engine.device, max_batch=8,
                          max_context=engine.max_model_len, capture=False)
    engine.runner.graphs = graphs
    oracle = load_peft_oracle(tiny_base.path, variant_adapter_dirs, quantize)
    check_against_peft(engine, oracle, NAMES, PROMPTS[:len(NAMES)], ATOL[quantize], new_tokens=4,
                       fp32=quantize == "none")
    assert graphs.static_steps >= 3 and (8, 64) in graphs.steps, "decode steps must take the static path"


def test_mixed_static_steps_match_peft(variant_registry, tiny_base, variant_adapter_dirs, engine_factory):
    """Steps holding prompt chunks through the static forward CUDA graphs capture (run eagerly
    here, the paged kernel under Triton's interpreter): one prefill of six prompts padded to its
    token bucket, then, with 16-token steps, chunks beside decode tokens and chunks that sample
    nothing. Each request equals PEFT with its adapter alone: logits at 1e-5, greedy tokens."""
    pytest.importorskip("triton")
    engine = engine_factory(variant_registry, tiny_base.name, run_loop=False, attention="triton",
                            max_batch_tokens=16, max_running=8)
    graphs = StepGraphs(engine.runner.model, engine.kv, engine.device, max_batch=8,
                        max_context=engine.max_model_len, capture=False, paged=True, max_tokens=64)
    assert graphs.token_buckets == [16, 32, 64]
    engine.runner.graphs = graphs
    steps = []  # what each static step held: (tokens, samples) per sequence
    static_forward = graphs.forward
    graphs.forward = lambda items, *fed: steps.append([(len(it.tokens), it.wants_logits) for it in items]) \
        or static_forward(items, *fed)
    oracle = load_peft_oracle(tiny_base.path, variant_adapter_dirs, "none")
    check_against_peft(engine, oracle, NAMES, PROMPTS[:len(NAMES)], ATOL["none"], new_tokens=4, fp32=True,
                       logits_only=True)
    assert graphs.mixed_steps == 1 and 32 < sum(n for n, _ in steps[0]) <= 64 and graphs.static_steps >= 3

    prompts = [p * 2 for p in PROMPTS[:len(NAMES)]]  # 12-20 tokens each: chunked at 16 per step
    handles = [engine.submit(GenerationRequest(adapter=n, prompt=p, sampling=SamplingParams(
        max_new_tokens=5, ignore_eos=True))) for n, p in zip(NAMES, prompts, strict=True)]
    while not all(h.done for h in handles):
        engine.step()
    for name, prompt, h in zip(NAMES, prompts, handles, strict=True):
        assert list(h.result().token_ids) == oracle_greedy(oracle, name, engine.tokenizer.encode(prompt), 5), name
    assert any({1, 2} <= {min(n, 2) for n, _ in step} for step in steps), "no step mixed decode tokens and a chunk"
    assert any(not samples for step in steps for _, samples in step), "no chunk that samples nothing"
    assert_variants_active(engine)


@pytest.mark.parametrize("op", ["reference", "segmented", "batched", "auto", "triton", "static-gathered",
                                "static-triton"])
def test_every_op_serves_dora_and_bias_with_a_base_bias(op):
    """One layer whose base has its own bias (Llama's have none; DoRA scales the base output
    without it, as PEFT's DoraLinearLayer does), slots holding a DoRA adapter and a lora_bias one,
    and base rows: each token equals PEFT's layer with that adapter alone. The Triton ops run
    under Triton's CPU interpreter without a GPU (the engine-level oracle above covers the others);
    static-*: the layer's forward in a captured step, with the CPU's and CUDA's static op."""
    from loradock.runtime.adapter_weights import dora_scale
    from loradock.runtime.batch_context import BatchContext, use_context
    from loradock.runtime.lora_layer import MultiLoRALinear
    from loradock.runtime.lora_ops import LORA_OPS, gathered_static_lora
    from peft import LoraConfig, get_peft_model

    from tests.runtime.test_lora_ops import make_batch, static_batch

    if op.endswith("triton"):
        pytest.importorskip("triton")
    torch.manual_seed(0)
    peft = get_peft_model(torch.nn.Sequential(torch.nn.Linear(12, 10)),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["0"], use_dora=True), adapter_name="dora")
    peft.add_adapter("bias", LoraConfig(r=2, lora_alpha=3, target_modules=["0"], lora_bias=True))
    peft.eval()
    lora = peft.base_model.model[0]
    base = lora.base_layer
    layer = MultiLoRALinear(base, 4, 8, torch.float32, torch.device("cpu"), LORA_OPS.get(op, LORA_OPS["auto"]))
    if op.startswith("static"):
        from loradock.runtime.triton_lora import triton_lora_into

        layer.static_op = triton_lora_into if op == "static-triton" else gathered_static_lora
    with torch.no_grad():
        for name in ("dora", "bias"):
            lora.lora_B[name].weight.normal_()
        lora.lora_B["bias"].bias.normal_()
        lora.lora_magnitude_vector["dora"].weight.mul_(1.5)
        shrink, b = 2.0 * lora.lora_A["dora"].weight, lora.lora_B["dora"].weight
        layer.set_slot(3, shrink, b.T, dora_scale=dora_scale(lora.lora_magnitude_vector["dora"].weight,
                                                             base.weight, shrink, b))
        layer.set_slot(1, 1.5 * lora.lora_A["bias"].weight, lora.lora_B["bias"].weight.T,
                       bias=1.5 * lora.lora_B["bias"].bias)
        x = torch.randn(1, 8, 12)
        batch = make_batch([0, 1, 3], [2, 3, 3])
        with use_context(BatchContext(lora=static_batch(batch) if op.startswith("static") else batch)):
            got = layer(x)[0]
        plain = base(x)[0]
        for name, rows in (("dora", slice(5, 8)), ("bias", slice(2, 5))):
            peft.set_adapter(name)
            want = peft(x)[0, rows]
            assert (want - plain[rows]).abs().max() > 0.1, "the adapter changes the output"
            torch.testing.assert_close(got[rows], want, atol=1e-5, rtol=0)
        torch.testing.assert_close(got[:2], plain[:2], atol=0, rtol=0)  # base rows untouched
        layer.set_slot(3, None, None)  # evicted: every buffer of the slot back to neutral
        assert layer.lora_dora_scale[3].abs().max() == 0 and 3 not in layer.dora_slots
        layer.set_slot(1, shrink, b.T)  # a plain adapter replaces the bias one: no stale bias row
        assert layer.lora_bias[1].abs().max() == 0 and 1 not in layer.bias_slots


def test_a_dora_run_of_loradock_train_publishes_and_serves_like_peft(registry, tiny_base, engine_factory,
                                                                      tmp_path):
    """`use_dora: true` trains, publishes as servable, and the engine serves it as PEFT does."""
    from loradock.trainer import train

    from tests.runtime.conftest import oracle_cached_logits
    from tests.runtime.test_oracle import mixed_step_logits
    from tests.trainer.conftest import make_tiny_config

    config = {**make_tiny_config(tmp_path, tiny_base.name), "use_dora": True, "max_steps": 2, "val_size": 0,
              "adapter_name": "colors", "lora_target": ["q_proj", "v_proj", "down_proj"]}
    version = train(config, registry=registry)
    assert (version.manifest["use_dora"], version.manifest["servable"]) == (True, True)
    engine = engine_factory(registry, tiny_base.name, run_loop=False)
    oracle = load_peft_oracle(tiny_base.path, {"colors": version.path}, "none")
    ids = engine.tokenizer.encode(PROMPTS[0])
    prefill, fed, decode = mixed_step_logits(engine, [("colors", ids), (None, ids)], decode_steps=1)
    for row, name in enumerate(["colors", None]):
        want_prefill, want_decode = oracle_cached_logits(oracle, name, ids, fed[row])
        torch.testing.assert_close(prefill[row], want_prefill, atol=ATOL["none"], rtol=0)
        torch.testing.assert_close(decode[row, 0], want_decode[0], atol=ATOL["none"], rtol=0)
    assert (prefill[0] - prefill[1]).abs().max() > 100 * ATOL["none"], "the trained adapter changes the logits"
