"""PEFT is the oracle: a mixed batch of many adapters in ONE forward pass gives each request
the logits (prefill, then each decode step) and greedy tokens of its adapter run alone through
PeftModel on the same base."""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
from loradock.runtime import GenerationRequest, SamplingParams
from loradock.runtime.model_runner import StepItem

from tests.bnb_cpu_kernel import bf16_cpu_kernel
from tests.runtime.conftest import (
    SPECS,
    load_peft_oracle,
    oracle_cached_logits,
    oracle_generate,
    oracle_greedy,
    oracle_logits,
)

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived",
    "Patient presents with",
    "Roses are red,",
    "2 + 2 =",
    "The mitochondria is",
    "Quarterly revenue grew by",
    "Hello",
    "Translate to German: good morning",
)
# Max |engine - PEFT| on logits: prefill against PEFT's full forward over the prompt, each decode
# step against PEFT's cached decode step over the same tokens (what PeftModel.generate computes;
# see "Why the NF4 oracle compares cached decode steps" in docs/architecture.md). fp32: only
# summation order differs (scaling folded into B, per-sequence attention). NF4: both sides run
# the same bitsandbytes kernels on the same weights.
ATOL = {"none": 1e-5, "nf4": 1e-5}
NF4_ATOL = {"float32": 1e-5, "bfloat16": None}  # None: within the bf16 kernel's own noise
# SmolLM2 has 30 layers and logits of magnitude ~20, so rounding differences accumulate more.
SMOLLM2_NF4_ATOL = {"float32": 2e-3, "bfloat16": None}
DECODE_STEPS = 3


def count_forwards(model) -> list[int]:
    calls = [0]
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def mixed_step_logits(engine, cases: list[tuple[str | None, list[int]]], decode_steps: int = 1):
    """Prefill every case in one forward, then decode `decode_steps` greedy tokens each, one
    forward per step. The only place these tests touch engine internals (the KV pool, runner, StepItem).
    Returns (prefill logits [cases, vocab], the tokens fed to each decode step [cases][steps],
    decode logits [cases, steps, vocab])."""
    slots = []
    for ref, _ in cases:
        if ref is None:
            slots.append(0)
        else:
            slots.append(engine.cache.slot_of(engine.load_adapter(ref)))
    tables: list[list[int]] = [[] for _ in cases]  # KV pool blocks of each case
    for table, (_, ids) in zip(tables, cases, strict=True):
        assert engine.kv.grow(table, len(ids) + decode_steps)
    prefill = engine.runner.forward([StepItem(table, 0, ids, s, True)
                                     for table, (_, ids), s in zip(tables, cases, slots, strict=True)])
    rows = torch.stack([prefill.row(i) for i in range(len(cases))])
    fed = [[t] for t in rows.argmax(dim=-1).tolist()]
    decode = []
    for step in range(decode_steps):
        out = engine.runner.forward([StepItem(table, len(ids) + step, [f[-1]], s, True)
                                     for table, (_, ids), f, s in zip(tables, cases, fed, slots, strict=True)])
        decode.append(torch.stack([out.row(i) for i in range(len(cases))]))
        if len(decode) < decode_steps:
            for f, t in zip(fed, decode[-1].argmax(dim=-1).tolist(), strict=True):
                f.append(t)
    for table in tables:
        engine.kv.free(table)
    return rows, fed, torch.stack(decode, dim=1)


def assert_served_nf4(engine) -> None:
    """Guards against "nf4" silently serving full precision or another 4-bit type: every wrapped
    base layer must be a bitsandbytes Linear4bit holding NF4 weights."""
    from bitsandbytes.nn import Linear4bit

    assert engine.layers, "the engine wrapped no layers"
    for name, layer in engine.layers.items():
        base = layer.base_layer
        assert isinstance(base, Linear4bit), f"{name} is {type(base).__name__}, not Linear4bit"
        quant_type = base.weight.quant_state.quant_type
        assert quant_type == "nf4", f"{name} holds {quant_type} weights, not nf4"


def assert_4bit_kernel(engine, compute: str) -> None:
    """After a forward, every 4-bit layer ran the kernel `compute` names: bitsandbytes' bf16 CPU
    kernel (repacked, bf16 state) for bfloat16, the float32 path otherwise."""
    for name, layer in engine.layers.items():
        state = layer.base_layer.weight.quant_state
        packed = getattr(state, "packing_format_for_cpu", False)
        assert packed == (compute == "bfloat16"), f"{name}: repacked for the bf16 kernel is {packed}"
        assert state.dtype == getattr(torch, compute), f"{name} computes in {state.dtype}"


def assert_logits_close(got: torch.Tensor, want: torch.Tensor, atol: float, what: str) -> float:
    torch.testing.assert_close(got, want, atol=atol, rtol=0, msg=lambda m: f"{what}: {m}")
    return (got - want).abs().max().item()


def kernel_noise(oracle, cases, fed) -> float:
    """How far PEFT disagrees with itself on one computation done two ways that are equal in
    exact arithmetic: its cached decode steps against its full forward over the same tokens.
    Under a kernel that rounds to bf16, a summation-order difference of one fp32 ulp flips a
    bf16 rounding now and then, and 30 layers carry the flip to the logits; this is that
    noise, measured on the same weights, prompts and kernel as the comparison it bounds."""
    worst = 0.0
    for (name, ids), tokens in zip(cases, fed, strict=True):
        _, cached = oracle_cached_logits(oracle, name, ids, tokens)
        full = oracle_logits(oracle, name, [*ids, *tokens])[len(ids):]
        worst = max(worst, (cached - full).abs().max().item())
    return worst


def assert_tokens_within_noise(oracle, name, ids: list[int], tokens: list[int], noise: float) -> None:
    """Each served token is PEFT's greedy choice after the same prefix, or, at a near-tie, a
    token whose PEFT logit is within `noise` of the top one."""
    logits = oracle_logits(oracle, name, [*ids, *tokens])[len(ids) - 1:-1]
    for step, (row, token) in enumerate(zip(logits, tokens, strict=True)):
        margin = (row.max() - row[token]).item()
        assert margin <= noise, f"{name}: token {step} is {margin:.3f} below PEFT's top logit (noise {noise:.3f})"


def check_against_peft(engine, oracle, names: list[str | None], prompts, atol: float | None, new_tokens: int,
                       greedy_oracle=oracle_greedy, ignore_eos: bool = True, fp32: bool = False,
                       decode_steps: int = DECODE_STEPS, logits_only: bool = False) -> dict[str, float]:
    """Assert the engine's mixed-batch logits and greedy outputs equal PEFT's for each request
    alone. `atol` None: the 4-bit kernel rounds to bf16, and logits must
    agree within twice PEFT's own disagreement with itself (`kernel_noise`), and tokens be
    PEFT's or within that of its top one. `fp32`: also hold decode to PEFT's full forward (cached and full paths agree
    in fp32 arithmetic). `logits_only`: skip the full-forward distance, the distinct-adapter
    check and generation. Returns the max differences seen."""
    tok = engine.tokenizer
    cases = [(name, tok.encode(p)) for name, p in zip(names, prompts, strict=True)]
    forwards = count_forwards(engine.runner.model)
    prefill, fed, decode = mixed_step_logits(engine, cases, decode_steps)
    assert forwards[0] == 1 + decode_steps, "the mixed batch must be one forward per step"

    worst = {"prefill": 0.0, "decode": 0.0}
    noise = None
    if atol is None:
        noise = worst["kernel noise"] = kernel_noise(oracle, cases, fed)
        atol = max(2 * noise, ATOL["nf4"])
    for i, (name, ids) in enumerate(cases):
        want_prefill, want_decode = oracle_cached_logits(oracle, name, ids, fed[i])
        worst["prefill"] = max(worst["prefill"], assert_logits_close(
            prefill[i], want_prefill, atol, f"prefill logits of {name}"))
        for step in range(decode_steps):
            worst["decode"] = max(worst["decode"], assert_logits_close(
                decode[i, step], want_decode[step], atol, f"decode step {step} logits of {name}"))
        if logits_only:
            continue
        full = oracle_logits(oracle, name, [*ids, *fed[i]])[len(ids):]
        full_diff = (decode[i] - full).abs().max().item()
        worst["decode vs full forward"] = max(worst.get("decode vs full forward", 0.0), full_diff)
        if fp32:
            assert_logits_close(decode[i], full, atol, f"decode logits of {name} vs full forward")
    print(f"max |engine - PEFT| logits (atol {atol:g}): "
          + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))
    if logits_only:
        return worst

    # The test can fail: every adapter changes the logits, and differently from the others.
    distinct = list(dict.fromkeys(names))
    rows, _, _ = mixed_step_logits(engine, [(name, cases[0][1]) for name in distinct])
    apart = 100 * atol if noise is None else 4 * atol
    for (a, ra), (b, rb) in itertools.combinations(zip(distinct, rows, strict=True), 2):
        assert (ra - rb).abs().max() > apart, f"{a} and {b} give the same logits"

    # Greedy generation through the full engine: all requests admitted together.
    handles = [engine.submit(GenerationRequest(adapter=name, prompt=p, sampling=SamplingParams(
        max_new_tokens=new_tokens, ignore_eos=ignore_eos))) for name, p in zip(names, prompts, strict=True)]
    steps_before = engine.steps
    while not all(h.done for h in handles):
        engine.step()
    assert engine.steps - steps_before <= new_tokens, "every step should serve all requests together"
    outputs = {}
    for (name, ids), h in zip(cases, handles, strict=True):
        result = h.result()
        if noise is None:
            assert list(result.token_ids) == greedy_oracle(oracle, name, ids, new_tokens), name
        else:
            assert_tokens_within_noise(oracle, name, ids, list(result.token_ids), atol)
        assert (result.adapter.name if result.adapter else None) == name
        outputs[name] = result.token_ids
    assert len(set(outputs.values())) > len(set(names)) // 2, "adapters should change the greedy outputs"
    return worst


# each op alone, over prefill and decode alike (auto picks per step)
@pytest.mark.parametrize("ops", ["auto", "reference", "segmented", "batched"])
def test_mixed_batch_matches_peft_tiny(tiny_registry, tiny_base, tiny_adapter_dirs, engine_factory, ops):
    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=False, quantize="none", lora_ops=ops)
    oracle = load_peft_oracle(tiny_base.path, tiny_adapter_dirs, "none")
    names = [s.name for s in SPECS] + [None, None]
    check_against_peft(engine, oracle, names, PROMPTS, ATOL["none"], new_tokens=6, fp32=True)


def test_mixed_batch_matches_peft_tiny_nf4(tiny_registry, tiny_base, tiny_adapter_dirs, engine_factory,
                                           cpu_4bit_compute):
    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=False, quantize="nf4",
                            compute_dtype=cpu_4bit_compute)
    assert_served_nf4(engine)
    assert engine.info().compute_dtype == cpu_4bit_compute
    oracle = load_peft_oracle(tiny_base.path, tiny_adapter_dirs, "nf4", compute=cpu_4bit_compute)
    names = [s.name for s in SPECS] + [None, None]
    check_against_peft(engine, oracle, names, PROMPTS, NF4_ATOL[cpu_4bit_compute], new_tokens=6)
    assert_4bit_kernel(engine, cpu_4bit_compute)


def test_triton_op_matches_peft_tiny(tiny_registry, tiny_base, tiny_adapter_dirs, engine_factory):
    """The CUDA kernels in the engine (under Triton's CPU interpreter where there is no GPU: a
    smaller case, as the interpreter runs every kernel program in Python)."""
    pytest.importorskip("triton")
    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=False, lora_ops="triton")
    assert engine.lora_fallback is None  # the start's warm-up ran the kernels
    names = ["law", "chem", "fin", None]
    oracle = load_peft_oracle(tiny_base.path, {n: tiny_adapter_dirs[n] for n in names if n}, "none")
    check_against_peft(engine, oracle, names, PROMPTS[:4], ATOL["none"], new_tokens=2, fp32=True,
                       decode_steps=1)


@pytest.fixture
def triton_fails(monkeypatch):
    """The layers get CUDA's ops (`pick_op("auto")` and the static op on a GPU); `fail(when)`
    makes each Triton launch for which `when(kwargs)` holds raise as it does where Triton finds
    no C compiler for its launcher."""
    from loradock.runtime import lora_layer, triton_lora
    from loradock.runtime.lora_ops import cuda_auto_lora

    monkeypatch.setattr(lora_layer, "pick_op", lambda name, device: cuda_auto_lora)
    monkeypatch.setattr(lora_layer, "pick_static_op", lambda device: triton_lora.triton_lora_into)
    launch = triton_lora.segmented_matmul

    def fail(when):
        def failing(*args, **kwargs):
            if when(kwargs):
                raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")
            return launch(*args, **kwargs)

        monkeypatch.setattr(triton_lora, "segmented_matmul", failing)

    return fail


def test_triton_kernels_that_cannot_run_fall_back_to_torch_ops(tiny_registry, tiny_base, tiny_adapter_dirs,
                                                                 engine_factory, triton_fails, caplog):
    """`auto` starts anyway, says why in the log and in its info, and serves with the torch ops,
    equal to PEFT."""
    from loradock.runtime.lora_ops import auto_lora, gathered_static_lora

    triton_fails(lambda kwargs: True)
    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=False)
    assert "Triton LoRA kernels failed at start (RuntimeError: Failed to find C compiler" in caplog.text
    assert engine.info().lora_ops == "auto (torch ops: Triton failed at start)"
    assert all(layer.op is auto_lora and layer.static_op is gathered_static_lora
               for layer in engine.layers.values())
    names = ["law", "chem", None]
    oracle = load_peft_oracle(tiny_base.path, {n: tiny_adapter_dirs[n] for n in names if n}, "none")
    check_against_peft(engine, oracle, names, PROMPTS[:3], ATOL["none"], new_tokens=3, fp32=True)


def test_a_fused_store_that_cannot_run_falls_back_in_captured_steps_only(tiny_registry, tiny_base, engine_factory,
                                                                         triton_fails, caplog):
    """The static op's kernel (expand adding into the base output as it stores) fails, the
    segmented kernels run: captured steps take the torch static op, eager ones keep Triton."""
    from loradock.runtime.lora_ops import cuda_auto_lora, gathered_static_lora

    pytest.importorskip("triton")  # the segmented kernels run, under the interpreter without a GPU
    triton_fails(lambda kwargs: kwargs.get("out") is not None)
    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=False)
    assert "fused Triton store of captured decode steps failed at start (RuntimeError" in caplog.text
    assert engine.info().lora_ops == "auto (torch op in captured steps: the fused Triton store failed at start)"
    assert all(layer.op is cuda_auto_lora and layer.static_op is gathered_static_lora
               for layer in engine.layers.values())


def test_triton_asked_for_by_name_refuses_to_start_where_it_cannot_run(tiny_registry, tiny_base, engine_factory,
                                                                       triton_fails):
    triton_fails(lambda kwargs: True)
    with pytest.raises(ValueError, match="lora_ops='triton': the Triton kernels failed at start "
                                         r"\(RuntimeError: Failed to find C compiler"):
        engine_factory(tiny_registry, tiny_base.name, run_loop=False, lora_ops="triton")


def test_int8_base_serves_adapters_like_peft(tiny_registry, tiny_base, tiny_adapter_dirs, engine_factory):
    """LLM.int8 computes activation columns holding an outlier (> 6.0) anywhere in the batch in
    fp16, so its logits depend on what shares the batch, in PEFT too: logits cannot be compared
    across batch compositions. Greedy tokens of single requests must still agree."""
    from bitsandbytes.nn import Linear8bitLt

    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=False, quantize="int8")
    assert isinstance(engine.layers["model.layers.0.mlp.down_proj"].base_layer, Linear8bitLt)
    names = ["med", "math", None]
    oracle = load_peft_oracle(tiny_base.path, {n: tiny_adapter_dirs[n] for n in names if n}, "int8")
    for name in names:
        result = engine.generate(GenerationRequest(adapter=name, prompt=PROMPTS[0], sampling=SamplingParams(
            max_new_tokens=5, ignore_eos=True)))
        assert list(result.token_ids) == oracle_greedy(oracle, name, engine.tokenizer.encode(PROMPTS[0]), 5)


@pytest.mark.slow
@pytest.mark.parametrize(("threads", "compute"), [(1, "float32"), (2, "float32"), (1, "bfloat16")])
def test_mixed_batch_matches_peft_smollm2_nf4(registry, smollm2_base, smollm2_adapter_dirs,
                                              engine_factory, threads, compute):
    """Guards against thread-count-dependent numerics: the logits must match PEFT with 1 and 2
    intra-op threads. Loading runs with 1; the 2-thread case checks prefill and one decode step
    only (2 threads are several times slower on a busy 2-core machine; the rest does not depend
    on the thread count)."""
    for name, path in smollm2_adapter_dirs.items():
        registry.publish(path, name, base=smollm2_base.name)
    with bf16_cpu_kernel() if compute == "bfloat16" else contextlib.nullcontext() as kernel:
        engine = engine_factory(registry, smollm2_base.name, run_loop=False, quantize="nf4", compute_dtype=compute)
        oracle = load_peft_oracle(smollm2_base.path, smollm2_adapter_dirs, "nf4", compute=compute)
    assert_served_nf4(engine)
    names = [s.name for s in SPECS] + [None, None]
    print(f"threads {threads}; 4-bit compute {compute} ({kernel or 'float32 path'})")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_against_peft(engine, oracle, names, PROMPTS, atol=SMOLLM2_NF4_ATOL[compute], new_tokens=4,
                           greedy_oracle=oracle_generate, ignore_eos=False,
                           decode_steps=DECODE_STEPS if threads == 1 else 1, logits_only=threads > 1)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    assert_4bit_kernel(engine, compute)
