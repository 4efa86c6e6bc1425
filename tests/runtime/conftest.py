"""Runtime test fixtures: real PEFT adapters, a registry holding them, engines, and the PEFT oracle."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from loradock.registry import BaseInfo, Registry
from loradock.runtime import Engine, EngineConfig

from tests.adapters import make_lora_adapter
from tests.bnb_cpu_kernel import bf16_cpu_kernel

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
ATTN_MLP = (*ATTN, "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Spec:
    name: str
    rank: int
    targets: tuple[str, ...]
    seed: int
    use_rslora: bool = False
    use_dora: bool = False
    lora_bias: bool = False

    @property
    def alpha(self) -> int:
        return 2 * self.rank


# >= 8 adapters: ranks 4/8/16, attention-only and attention+MLP targets, one rsLoRA.
SPECS = (
    Spec("law", 4, ATTN, 1),
    Spec("med", 8, ATTN_MLP, 2),
    Spec("code", 16, ATTN, 3),
    Spec("chem", 16, ATTN_MLP, 4),
    Spec("poem", 8, ("q_proj", "v_proj"), 5),
    Spec("math", 4, ATTN_MLP, 6, use_rslora=True),
    Spec("bio", 8, ATTN, 7),
    Spec("fin", 16, ("down_proj", "up_proj"), 8),
)


def make_adapters(base: BaseInfo, out: Path, specs=SPECS, scale: float = 0.5) -> dict[str, Path]:
    """PEFT adapter directories for `specs` on `base`: {name: dir}."""
    with one_thread():
        return {
            s.name: make_lora_adapter(base.path, out / s.name, rank=s.rank, alpha=s.alpha,
                                      targets=s.targets, seed=s.seed, use_rslora=s.use_rslora, scale=scale,
                                      use_dora=s.use_dora, lora_bias=s.lora_bias)
            for s in specs
        }


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tests here run on a small shared machine, where one intra-op thread is several times
    faster than two (a descheduled OpenMP worker stalls every small op)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture(scope="session")
def tiny_adapter_dirs(tiny_base: BaseInfo, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_adapters(tiny_base, tmp_path_factory.mktemp("tiny-adapters"))


@pytest.fixture
def tiny_registry(registry: Registry, tiny_base: BaseInfo, tiny_adapter_dirs: dict[str, Path]) -> Registry:
    """A fresh registry with every SPECS adapter published (version 1) for the tiny base."""
    for name, path in tiny_adapter_dirs.items():
        registry.publish(path, name, base=tiny_base.name)
    return registry


@pytest.fixture
def engine_factory() -> Iterator[Callable[..., Engine]]:
    """make(registry, base_name, run_loop=True, **config) -> started Engine (shut down after the test)."""
    engines: list[Engine] = []

    def make(registry: Registry, base: str, run_loop: bool = True, **overrides) -> Engine:
        cfg = {"quantize": "none", "max_slots": 8, "max_rank": 16, "max_running": 16,
               "max_batch_tokens": 256, "max_model_len": 512, "max_prompt_tokens": 256,
               "kv_cache_tokens": 8192, "registry_poll_s": 0.0, **overrides}
        engine = Engine(EngineConfig(base=base, **cfg), registry).start(run_loop=run_loop)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.shutdown(drain=False, timeout=5)


@pytest.fixture(params=["float32", "bfloat16"])
def cpu_4bit_compute(request) -> Iterator[str]:
    """Both ways an NF4 base computes on CPU: float32 (`--compute-dtype` auto), and bitsandbytes'
    AVX512-BF16 kernel (`--compute-dtype bfloat16`: native on CPUs that have it, emulated
    elsewhere), for the engine and the oracle alike; build both inside the test."""
    if request.param == "float32":
        yield "float32"
        return
    with bf16_cpu_kernel():
        yield "bfloat16"


def oracle_quantization_config(quantize: str, compute: str = "float32"):
    """The oracle's own BitsAndBytesConfig, written out here and not taken from loradock: a
    config shared with the code under test would let both sides drift together (e.g. "nf4"
    silently loading full precision on both and still agreeing)."""
    from transformers import BitsAndBytesConfig

    if quantize == "none":
        return None
    if quantize == "nf4":
        # What the runtime serves on CPU: NF4 weights, no double quantization, float32 compute
        # unless asked for bf16.
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=getattr(torch, compute),
                                  bnb_4bit_use_double_quant=False)
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"no oracle for quantization {quantize!r}")


def load_peft_oracle(base_path: Path, adapters: dict[str, Path], quantize: str, device: str = "cpu",
                     compute: str = "float32"):
    """A PeftModel on a separately loaded base (same quantization, float32 activations, 4-bit
    matmuls in `compute`) holding all adapters, on `device`."""
    from bitsandbytes.nn import Linear4bit
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"dtype": torch.float32}
    qconfig = oracle_quantization_config(quantize, compute)
    if qconfig is not None:
        kwargs.update(quantization_config=qconfig, device_map={"": device})
    base = AutoModelForCausalLM.from_pretrained(base_path, **kwargs).eval()
    if qconfig is None:
        base.to(device)
    if compute == "float32":  # else bitsandbytes computes in bf16 on AVX512-BF16 CPUs
        for layer in base.modules():
            if isinstance(layer, Linear4bit):
                layer.support_avx512bf16_for_cpu = False
    names = list(adapters)
    model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    return model.eval()


@contextlib.contextmanager
def oracle_adapter(model, adapter: str | None) -> Iterator[None]:
    """Run `model` with one adapter active (None: the base alone)."""
    if adapter is None:
        with model.disable_adapter():
            yield
    else:
        model.set_adapter(adapter)
        yield


@torch.inference_mode()
def oracle_logits(model, adapter: str | None, ids: list[int]) -> torch.Tensor:
    """Logits [len(ids), vocab] of `ids` through one adapter alone, in one full forward."""
    x = torch.tensor([ids], device=model.device)
    with oracle_adapter(model, adapter):
        return model(input_ids=x).logits[0].float()


@torch.inference_mode()
def oracle_cached_logits(model, adapter: str | None, ids: list[int],
                         next_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(prefill [vocab], decode [len(next_ids), vocab]): the logits after `ids` from one full
    forward, then one KV-cached step per token of `next_ids` (use_cache=True, the cache passed
    back in), bit-identical to the decode steps of PeftModel.generate."""
    x = torch.tensor([ids])
    with oracle_adapter(model, adapter):
        out = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=True)
        prefill, cache, decode = out.logits[0, -1].float(), out.cache, []
        for n, token in enumerate(next_ids, start=len(ids) + 1):
            mask = torch.ones(1, n, dtype=torch.long)
            out = model(input_ids=torch.tensor([[token]]), attention_mask=mask, cache=cache,
                        use_cache=True)
            decode.append(out.logits[0, -1].float())
    return prefill, torch.stack(decode)


def oracle_greedy(model, adapter: str | None, ids: list[int], n: int) -> list[int]:
    """n greedy tokens (EOS not special) by recomputing the full sequence each step."""
    out: list[int] = []
    for _ in range(n):
        out.append(int(oracle_logits(model, adapter, ids + out)[-1].argmax()))
    return out


def drive(engine, handles, max_idle_s: float = 60.0) -> None:
    """Step an engine started with run_loop=False until every handle is done."""
    import time

    idle_since = time.monotonic()
    while not all(h.done for h in handles):
        if engine.step():
            idle_since = time.monotonic()
        else:  # waiting for an adapter load in the loader pool
            assert time.monotonic() - idle_since < max_idle_s, "engine made no progress"
            time.sleep(0.005)


@torch.inference_mode()
def oracle_generate(model, adapter: str | None, ids: list[int], n: int) -> list[int]:
    """Greedy tokens from PeftModel.generate (KV-cached; stops after EOS, which it includes)."""
    x = torch.tensor([ids])
    with oracle_adapter(model, adapter):
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                             do_sample=False)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="session")
def smollm2_adapter_dirs(smollm2_base: BaseInfo, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """SPECS on the real SmolLM2; smaller weights keep its outputs language-like."""
    return make_adapters(smollm2_base, tmp_path_factory.mktemp("smollm2-adapters"), scale=0.1)
