"""One quantization recipe from training to serving: the trainer records the recipe it trained
on in the manifest, the runtime serves the base with its one recipe and reports, per adapter,
when the two differ (log warning, ListAdapters field, `loradock adapters show`)."""

from __future__ import annotations

import contextlib
import io
import logging
import os

import pytest
from loradock.registry import Registry
from loradock.registry.quantization import DEFAULT_DOUBLE_QUANT, QuantizationRecipe, recorded_recipe
from loradock.runtime import Engine, EngineConfig
from loradock.runtime.server import catalog, convert
from loradock.runtime.types import GenerationRequest, SamplingParams
from loradock.trainer import train

from loradock.cli import main
from tests.bnb_cpu_kernel import bf16_cpu_kernel
from tests.trainer.conftest import make_tiny_config


@pytest.fixture(scope="module")
def qlora_home(tmp_path_factory, session_home, tiny_base):
    """Two QLoRA adapters on the tiny base: `same` with the default recipe, `other` with double
    quantization flipped."""
    root = tmp_path_factory.mktemp("recipe")
    (root / "home").mkdir()
    os.symlink(session_home / "bases", root / "home" / "bases")
    registry = Registry(root / "home")
    for name, double in (("same", DEFAULT_DOUBLE_QUANT), ("other", not DEFAULT_DOUBLE_QUANT)):
        config = {**make_tiny_config(root / name, tiny_base.name), "adapter_name": name,
                  "quantization_bit": 4, "double_quantization": double, "max_steps": 2, "val_size": 2,
                  "device": "cpu"}
        train(config, registry=registry)
    return root / "home"


@pytest.fixture(scope="module")
def engine(qlora_home, tiny_base):
    engine = Engine(EngineConfig(base=tiny_base.name, quantize="nf4", device="cpu", cpu_threads=1,
                                 max_rank=16, max_model_len=256, max_prompt_tokens=128,
                                 kv_cache_tokens=1024, registry_poll_s=0.0),
                    Registry(qlora_home)).start()
    yield engine
    engine.shutdown(drain=False, timeout=5)


def served_4bit_weights(engine: Engine) -> list:
    import bitsandbytes as bnb

    return [m.weight for m in engine.runner.model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def test_the_manifest_records_the_recipe_the_runtime_serves(engine, qlora_home):
    manifest = Registry(qlora_home).resolve("same").manifest
    assert recorded_recipe(manifest) == engine.recipe == QuantizationRecipe.named("nf4", "float32")
    # ... and the served base really is quantized that way
    weights = served_4bit_weights(engine)
    assert weights, "the served base has no 4-bit layers"
    assert {w.quant_state.nested for w in weights} == {engine.recipe.double_quant}
    # ... and computes in float32, on CPUs where bitsandbytes alone would switch to its bf16 kernel too
    assert engine.info().compute_dtype == "float32"
    engine.generate(GenerationRequest(adapter="same", prompt="item 3 is", sampling=SamplingParams(max_new_tokens=2)))
    assert {str(w.quant_state.dtype) for w in weights} == {"torch.float32"}


def test_an_adapter_trained_on_another_recipe_is_served_with_a_warning(engine, qlora_home, caplog):
    registry = Registry(qlora_home)
    expected = (f"double_quant: trained {not DEFAULT_DOUBLE_QUANT}, served {DEFAULT_DOUBLE_QUANT}")
    with caplog.at_level(logging.WARNING, logger="loradock.runtime"):
        for ref in ("same", "other"):
            result = engine.generate(GenerationRequest(adapter=ref, prompt="item 3 is",
                                                       sampling=SamplingParams(max_new_tokens=2)))
            assert result.adapter.ref == f"{ref}@1"  # served, not refused
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [w for w in warnings if "quantized differently" in w] == [
        f"adapter other@1 was trained on a base quantized differently from the one served ({expected}); "
        "its answers may differ from training's"
    ]

    # ListAdapters carries it per version, through protobuf and back
    views = {v.name: v for v in catalog.list_adapters(registry, engine)}
    same, other = (convert.adapter_view_from_proto(convert.adapter_view_to_proto(views[n])).versions[0]
                   for n in ("same", "other"))
    assert (same.trained_quantization, same.quantization_mismatch) == (engine.recipe.describe(), "")
    assert other.quantization_mismatch == expected
    assert other.trained_quantization.startswith("nf4") and other.trained_quantization != same.trained_quantization

    # `loradock adapters show` names the recipe it was trained with
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["--home", str(qlora_home), "adapters", "show", "other"]) == 0
    line = next(x for x in out.getvalue().splitlines() if x.startswith("quantization"))
    assert other.trained_quantization in line


def test_bf16_compute_is_what_runs_and_what_is_reported(qlora_home, tiny_base):
    """`--compute-dtype bfloat16` on CPU: bitsandbytes' AVX512-BF16 kernel (emulated where the CPU
    lacks it) runs, and the recipe, GetInfo and ListAdapters say bfloat16."""
    with bf16_cpu_kernel():
        engine = Engine(EngineConfig(base=tiny_base.name, quantize="nf4", compute_dtype="bfloat16", device="cpu",
                                     cpu_threads=1, max_rank=16, max_model_len=256, max_prompt_tokens=128,
                                     kv_cache_tokens=1024, registry_poll_s=0.0),
                        Registry(qlora_home)).start()
    try:
        assert engine.recipe == QuantizationRecipe.named("nf4", "bfloat16")
        assert (engine.info().dtype, engine.info().compute_dtype) == ("float32", "bfloat16")
        engine.generate(GenerationRequest(adapter="same", prompt="item 3 is", sampling=SamplingParams(max_new_tokens=2)))
        assert {str(w.quant_state.dtype) for w in served_4bit_weights(engine)} == {"torch.bfloat16"}
        view = {v.name: v for v in catalog.list_adapters(Registry(qlora_home), engine)}["same"].versions[0]
        assert view.quantization_mismatch == "compute_dtype: trained float32, served bfloat16"
    finally:
        engine.shutdown(drain=False, timeout=5)
