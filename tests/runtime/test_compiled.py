"""The compiled model path (`compile="on"`, runtime/compiled.py) against the PEFT oracle: the
same mixed batches as test_oracle.py, every step through the compiled graphs (counted by their
opaque LoRA op), and no compile once the engine has started."""

from __future__ import annotations

import os

import pytest
import torch
from loradock.runtime import GenerationRequest, SamplingParams, lora_layer
from loradock.runtime.model_runner import StepItem

from tests.runtime.conftest import SPECS, load_peft_oracle, oracle_greedy
from tests.runtime.test_families import FAMILIES, build_family
from tests.runtime.test_oracle import (
    ATOL,
    NF4_ATOL,
    PROMPTS,
    assert_4bit_kernel,
    check_against_peft,
    count_forwards,
)


@pytest.fixture
def compiled_layer_calls(monkeypatch) -> list[int]:
    """[calls of the compiled graphs' opaque LoRA op]: an eager forward never makes one."""
    calls = [0]
    lookup = lora_layer.boundary_layer

    def counted(index: int):
        calls[0] += 1
        return lookup(index)

    monkeypatch.setattr(lora_layer, "boundary_layer", counted)
    return calls


def graphs_compiled() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_compiled_mixed_batches_match_peft(tiny_registry, tiny_base, tiny_adapter_dirs, engine_factory,
                                           compiled_layer_calls):
    before = graphs_compiled()
    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=False, quantize="none", compile="on")
    assert engine.runner.model_forward is not engine.runner.model and engine.info().compile == "on"
    compiled_at_start = graphs_compiled()
    assert compiled_at_start - before == 1, "one graph serves every step shape"
    calls_at_start = compiled_layer_calls[0]
    forwards = count_forwards(engine.runner.model)
    oracle = load_peft_oracle(tiny_base.path, tiny_adapter_dirs, "none")
    names = [s.name for s in SPECS] + [None, None]  # DoRA, LoRA bias, ranks 4-16, the base
    check_against_peft(engine, oracle, names, PROMPTS, ATOL["none"], new_tokens=6, fp32=True)
    # Every step ran the compiled graphs: each forward calls the op once per wrapped layer.
    assert forwards[0] >= 12
    assert compiled_layer_calls[0] - calls_at_start == forwards[0] * len(engine.layers)

    # One sequence alone: steps of one token.
    ids = engine.tokenizer.encode(PROMPTS[0])
    result = engine.generate(GenerationRequest(adapter="law", prompt_token_ids=tuple(ids), sampling=SamplingParams(
        max_new_tokens=6, ignore_eos=True)))
    assert list(result.token_ids) == oracle_greedy(oracle, "law", ids, 6)

    # Prompt log probabilities (every logit kept), and a step of a prompt chunk that keeps no
    # logit (a prompt longer than the step's budget): the graph of the start serves them too.
    long = "The quick brown fox jumps over the lazy dog near the bank of the river " * 5
    handles = [engine.submit(GenerationRequest(adapter=name, prompt=long, sampling=SamplingParams(
        max_new_tokens=3, prompt_logprobs=0))) for name in ("law", "chem", None)]
    while not all(h.done for h in handles):
        engine.step()
    assert all(len(h.result().prompt_logprobs) > 20 for h in handles)
    blocks: list[int] = []
    assert engine.kv.grow(blocks, 8)
    calls = compiled_layer_calls[0]
    assert engine.runner.forward([StepItem(blocks, 0, list(range(5, 13)), 0, False)]).logits.shape[0] == 0
    engine.kv.free(blocks)
    assert compiled_layer_calls[0] - calls == len(engine.layers)
    assert graphs_compiled() == compiled_at_start, "a request's step compiled a graph"


def test_compiled_nf4_matches_peft(tiny_registry, tiny_base, tiny_adapter_dirs, engine_factory, cpu_4bit_compute,
                                   compiled_layer_calls):
    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=False, quantize="nf4",
                            compute_dtype=cpu_4bit_compute, compile="on")
    oracle = load_peft_oracle(tiny_base.path, tiny_adapter_dirs, "nf4", compute=cpu_4bit_compute)
    names = [s.name for s in SPECS] + [None, None]
    calls_at_start = compiled_layer_calls[0]
    forwards = count_forwards(engine.runner.model)
    check_against_peft(engine, oracle, names, PROMPTS, NF4_ATOL[cpu_4bit_compute], new_tokens=6)
    assert compiled_layer_calls[0] - calls_at_start == forwards[0] * len(engine.layers) > 0
    assert_4bit_kernel(engine, cpu_4bit_compute)


def test_compile_off_and_auto_on_cpu_serve_eagerly(tiny_registry, tiny_base, engine_factory):
    for mode in ("off", "auto"):
        engine = engine_factory(tiny_registry, tiny_base.name, run_loop=False, compile=mode, device="cpu")
        assert engine.runner.model_forward is engine.runner.model and engine.info().compile == "off"
        engine.shutdown(drain=False)


# Soft-capping, windows and query scalars; partial rotary with a dense projection. Every family
# (MoE routing included; 150 s here): LORADOCK_COMPILE_ALL_FAMILIES=1.
SWEEP = sorted(FAMILIES) if os.environ.get("LORADOCK_COMPILE_ALL_FAMILIES") == "1" else ["gemma2", "phi"]


@pytest.mark.parametrize("family_name", SWEEP)
def test_compiled_families_match_peft(family_name, session_home, tokenizer_dir, tmp_path, registry, engine_factory,
                                      compiled_layer_calls):
    """Each family's own maths compiled around the opaque ops: windows and soft-capping
    (Gemma 2, 3), fused projections (Phi-3, GPT-NeoX, Falcon), MoE routing, no-RoPE layers."""
    base, dirs = build_family(family_name, session_home, tokenizer_dir, tmp_path)
    for name, path in dirs.items():
        registry.publish(path, name, base=base.name)
    engine = engine_factory(registry, base.name, run_loop=False, compile="on")
    calls_at_start = compiled_layer_calls[0]
    oracle = load_peft_oracle(base.path, dirs, "none")
    check_against_peft(engine, oracle, ["attn", "all", None, "attn"], PROMPTS[:4], ATOL["none"], new_tokens=5,
                       fp32=True)
    assert compiled_layer_calls[0] > calls_at_start


def test_a_failed_compile_serves_eagerly_under_auto_and_refuses_to_start_under_on(
        tiny_registry, tiny_base, engine_factory, monkeypatch, caplog):
    from loradock.runtime import engine as engine_module
    from loradock.runtime import model_runner

    def broken(self, blocks):
        raise RuntimeError("InductorError: no working C++ compiler found")

    monkeypatch.setattr(model_runner.ModelRunner, "compile", broken)
    with pytest.raises(ValueError, match=r"compile='on': compiling the model failed \(RuntimeError: Inductor"):
        engine_factory(tiny_registry, tiny_base.name, run_loop=False, compile="on")
    monkeypatch.setattr(engine_module, "wants_compile", lambda mode, device: True)  # "auto" as on CUDA
    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=False, compile="auto")
    assert engine.runner.model_forward is engine.runner.model
    assert engine.info().compile == "off (compile failed: RuntimeError)"
    assert "compiling the model failed (RuntimeError: InductorError" in caplog.text
    result = engine.generate(GenerationRequest(adapter="law", prompt="Hello", sampling=SamplingParams(
        max_new_tokens=3, ignore_eos=True)))
    assert len(result.token_ids) == 3


def test_compiled_static_steps_match_peft(tiny_registry, tiny_base, tiny_adapter_dirs, engine_factory,
                                          compiled_layer_calls):
    """The static forwards CUDA graphs capture (run here without capturing) through the compiled
    model, with the paged kernel as on CUDA (under Triton's interpreter here): the prefill as a
    mixed step padded to its token bucket, then decode steps padded to a batch bucket; every slot
    at full rank, bias/DoRA rows always applied. Each request still equals PEFT."""
    from loradock.runtime.cuda_graphs import StepGraphs

    pytest.importorskip("triton")
    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=False, quantize="none", compile="on",
                            attention="triton")
    graphs = StepGraphs(engine.runner.model, engine.kv, engine.device, max_batch=16,
                        max_context=engine.max_model_len, capture=False, paged=True, max_tokens=64)
    engine.runner.graphs = graphs
    graphs.use_forward(engine.runner.model_forward, engine.runner.lora_layers)
    calls_at_start = compiled_layer_calls[0]
    forwards = count_forwards(engine.runner.model)
    oracle = load_peft_oracle(tiny_base.path, tiny_adapter_dirs, "none")
    names = [s.name for s in SPECS] + [None, None]
    check_against_peft(engine, oracle, names, PROMPTS, ATOL["none"], new_tokens=4, fp32=True, logits_only=True)
    assert graphs.static_steps == 3 and graphs.mixed_steps == 1
    # every forward, the static ones included, ran the compiled graph (no guard sent one eager)
    assert compiled_layer_calls[0] - calls_at_start == forwards[0] * len(engine.layers)


def test_the_inductor_cache_is_loradocks_unless_a_person_chose_one(monkeypatch, tmp_path):
    from loradock.runtime.compiled import compile_model
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what importing inductor leaves
    compile_model(torch.nn.Linear(2, 2))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "xdg" / "loradock" / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    compile_model(torch.nn.Linear(2, 2))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
