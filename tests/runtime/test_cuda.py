"""The engine on CUDA (`make gpu-check`; skipped without a GPU): NF4 and bf16 serve, and mixed
batches equal PeftModel on the same device, with the LoRA ops and attention chosen by "auto"
(and SDPA for comparison), the forward compiled and steps scheduled asynchronously as "auto"
does there (and, once, eager and synchronous), and steps replayed as CUDA graphs: decode steps, and with the paged kernel the steps holding prompt
chunks (and, for comparison, run eagerly)."""

from __future__ import annotations

import pytest
import torch
from loradock.runtime import GenerationRequest, SamplingParams

from tests.runtime.conftest import SPECS, load_peft_oracle, oracle_greedy
from tests.runtime.test_oracle_variants import variant_adapter_dirs, variant_registry  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPTS = ("The capital of France is", "def fibonacci(n):", "Patient presents with", "Hello")


@pytest.mark.parametrize(("quantize", "dtype"), [("nf4", "bfloat16"), ("none", "bfloat16")])
def test_engine_serves_on_cuda(tiny_registry, tiny_base, engine_factory, quantize, dtype):
    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=False, device="cuda",
                            quantize=quantize, dtype=dtype)
    assert engine.kv.k.is_cuda and all(layer.lora_shrink.is_cuda for layer in engine.layers.values())
    results = [engine.generate(GenerationRequest(adapter=a, prompt=p, sampling=SamplingParams(
        max_new_tokens=6, ignore_eos=True))) for a, p in zip(["law", None, "med", "code"], PROMPTS,
                                                              strict=True)]
    assert all(len(r.token_ids) == 6 for r in results)
    assert engine.info().compile == "on"  # "auto" compiles on CUDA (a failure would say why here)
    assert engine.async_scheduling  # "auto" launches each step before the last one's tokens are read
    graphs = engine.runner.graphs
    assert graphs.failed is None, graphs.failed
    assert len(graphs.steps) == len(graphs.batch_buckets) * len(graphs.context_buckets)
    assert all(s.graph is not None for s in graphs.steps.values()) and graphs.static_steps >= 5
    # "auto" attention is the paged kernel on CUDA, so steps holding prompts are captured too
    assert graphs.mixed_failed is None, graphs.mixed_failed
    assert sorted(graphs.mixed) == graphs.token_buckets and all(s.graph is not None for s in graphs.mixed.values())
    assert graphs.mixed_steps >= 4  # each request's prompt


@pytest.mark.parametrize("attention", ["auto", "sdpa"])
@pytest.mark.parametrize("cuda_graphs", [True, False])
@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_mixed_batch_greedy_matches_peft_on_cuda(tiny_registry, tiny_base, tiny_adapter_dirs, engine_factory,
                                                 quantize, cuda_graphs, attention):
    """fp32 compute on CUDA, so greedy tokens can be compared exactly with PEFT's; "auto" attention
    is the paged Triton kernel there (a fallback to SDPA fails the test, with its reason)."""
    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=False, device="cuda",
                            quantize=quantize, dtype="float32", cuda_graphs=cuda_graphs, attention=attention)
    assert engine.info().attention == ("triton" if attention == "auto" else "sdpa")
    names = [s.name for s in SPECS[:4]] + [None]
    oracle = load_peft_oracle(tiny_base.path, {n: tiny_adapter_dirs[n] for n in names if n}, quantize,
                              device="cuda")
    assert_greedy_matches_peft(engine, oracle, names, [*PROMPTS, "Roses are red,"])
    if cuda_graphs:
        graphs = engine.runner.graphs
        assert graphs.failed is None and graphs.static_steps >= 5
        assert graphs.mixed_failed is None and graphs.mixed_steps >= (1 if attention == "auto" else 0)
    else:
        assert engine.runner.graphs is None


def test_the_eager_path_matches_peft_on_cuda(tiny_registry, tiny_base, tiny_adapter_dirs, engine_factory):
    """compile='off' and async_scheduling='off' (the other tests compile and schedule
    asynchronously, as 'auto' does on CUDA): eager prompt steps, the eager model captured, each
    step's tokens read back before the next is planned."""
    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=False, device="cuda", quantize="none",
                            dtype="float32", compile="off", async_scheduling="off")
    assert not engine.runner.compiled and not engine.async_scheduling
    names = [s.name for s in SPECS[:4]] + [None]
    oracle = load_peft_oracle(tiny_base.path, {n: tiny_adapter_dirs[n] for n in names if n}, "none", device="cuda")
    assert_greedy_matches_peft(engine, oracle, names, [*PROMPTS, "Roses are red,"])
    assert engine.runner.graphs.failed is None and engine.runner.graphs.static_steps >= 5


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_dora_and_lora_bias_greedy_match_peft_on_cuda(variant_registry, tiny_base,  # noqa: F811
                                                      variant_adapter_dirs, engine_factory, quantize):  # noqa: F811
    """DoRA's norms are taken against the served base weight where it lives (on the GPU)."""
    engine = engine_factory(variant_registry, tiny_base.name, run_loop=False, device="cuda",
                            quantize=quantize, dtype="float32")
    names = ["dora", "lbias", "law", None]
    oracle = load_peft_oracle(tiny_base.path, {n: variant_adapter_dirs[n] for n in names if n}, quantize,
                              device="cuda")
    assert_greedy_matches_peft(engine, oracle, names, PROMPTS)
    assert engine.runner.graphs.failed is None and engine.runner.graphs.static_steps >= 5


def test_transfers_do_not_wait_for_the_device_queue():
    """What asynchronous scheduling rests on: with a long kernel queued, a host list reaches the
    device (`to_device`) and a step's sampled tokens reach the host (`SampledTokens.tolist`,
    sampled before that kernel) without waiting for it."""
    from loradock.runtime.transfer import SampledTokens, to_device

    device = torch.device("cuda")
    for _ in range(2):  # pinned blocks in the caching host allocator, as in a running engine
        SampledTokens(to_device([0, 1, 2], device), [], torch.zeros(1, device=device)).tolist()
    torch.cuda.synchronize()
    tokens = torch.arange(6, device=device) * 7
    sampled = SampledTokens(tokens, [], tokens.float())
    torch.cuda._sleep(2_000_000_000)  # about a second of busy device, queued after the sampling
    behind = torch.cuda.Event()
    behind.record()
    rows = to_device([3, 1, 4], device)
    assert sampled.tolist() == [0, 7, 14, 21, 28, 35]
    assert not behind.query(), "the host waited for the queued kernel"
    assert rows.tolist() == [3, 1, 4]  # this one waits, and the copy came through


@pytest.mark.parametrize(("quantize", "capability", "kernel"), [
    ("fp8", (8, 9), "FP8 tensor cores"), ("int4", (8, 0), "tinygemm's int4 kernel")])
def test_gpu_formats_serve_on_their_kernels(tiny_registry, tiny_base, engine_factory, quantize, capability, kernel):
    """quantize="fp8" (torch._scaled_mm; Hopper, Ada) and "int4" (torch._weight_int4pack_mm;
    Ampere on) in bf16 run the device's kernel, not the emulation (it agreed with the spec at
    start), through the compiled forward and both kinds of graph, every request served."""
    if torch.cuda.get_device_capability() < capability:
        pytest.skip(f"no {kernel} on this GPU")
    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=False, device="cuda", quantize=quantize,
                            dtype="bfloat16")
    assert engine.info().quantization == quantize, engine.info().quantization
    results = [engine.generate(GenerationRequest(adapter=a, prompt=p, sampling=SamplingParams(
        max_new_tokens=6, ignore_eos=True))) for a, p in zip(["law", None, "med", "code"], PROMPTS, strict=True)]
    assert all(len(r.token_ids) == 6 for r in results)
    graphs = engine.runner.graphs
    assert graphs.failed is None and graphs.mixed_failed is None and graphs.static_steps >= 5


def assert_greedy_matches_peft(engine, oracle, names, prompts, new_tokens: int = 6) -> None:
    """All requests in one batch; each one's greedy tokens equal PEFT's with its adapter alone."""
    handles = [engine.submit(GenerationRequest(adapter=n, prompt=p, sampling=SamplingParams(
        max_new_tokens=new_tokens, ignore_eos=True))) for n, p in zip(names, prompts, strict=True)]
    while not all(h.done for h in handles):
        engine.step()
    for name, prompt, h in zip(names, prompts, handles, strict=True):
        ids = engine.tokenizer.encode(prompt)
        assert list(h.result().token_ids) == oracle_greedy(oracle, name, ids, new_tokens), name
