"""The torch-free facts the trainer and the runtime share through the registry: the
quantization recipe, base resolution, the device rule and field docstrings."""

from __future__ import annotations

import dataclasses
import re
import shutil

import pytest
from loradock.registry import InvalidBaseError, NotFoundError, Registry
from loradock.registry.devices import device_name
from loradock.registry.docstrings import field_docs
from loradock.registry.quantization import (
    DEFAULT_DOUBLE_QUANT,
    QuantizationRecipe,
    recipe_mismatch,
    recorded_recipe,
)


def test_recipe_names_map_to_bitsandbytes_settings():
    nf4 = QuantizationRecipe.named("nf4", "float32", double_quant=True)
    assert nf4.bnb_kwargs() == {
        "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": "float32", "bnb_4bit_quant_storage": "uint8",
    }
    assert QuantizationRecipe.named("nf4", "bfloat16").double_quant is DEFAULT_DOUBLE_QUANT
    assert QuantizationRecipe.named("int8", "float32", double_quant=True).bnb_kwargs() == {"load_in_8bit": True}
    none = QuantizationRecipe.named("none", "bfloat16")
    assert none.bnb_kwargs() is None and not none.quantized and none.storage_dtype == "bfloat16"


def test_transformers_accepts_the_recipe_as_plain_names():
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(**QuantizationRecipe.named("nf4", "float32", True).bnb_kwargs())
    assert (str(config.bnb_4bit_compute_dtype), str(config.bnb_4bit_quant_storage)) == ("torch.float32", "torch.uint8")
    assert config.bnb_4bit_use_double_quant is True


def test_bad_recipes_are_refused_with_what_is_wrong():
    with pytest.raises(ValueError, match="unknown quantization 'nf5'"):
        QuantizationRecipe.named("nf5", "float32")
    with pytest.raises(ValueError, match="compute dtype 'float64'"):
        QuantizationRecipe.named("nf4", "float64")
    with pytest.raises(ValueError, match="lacks double_quant"):
        QuantizationRecipe.from_json({"method": "none", "quant_type": "none"})


def test_the_manifest_record_round_trips_and_differences_are_named():
    trained = QuantizationRecipe.named("nf4", "float32", double_quant=True)
    manifest = {"training": {"quantization": trained.to_json()}}
    assert recorded_recipe(manifest) == trained
    assert recipe_mismatch(manifest, trained) == ""
    served = QuantizationRecipe.named("nf4", "bfloat16", double_quant=False)
    assert recipe_mismatch(manifest, served) == (
        "double_quant: trained True, served False; compute_dtype: trained float32, served bfloat16")
    # a Hub or imported adapter records no recipe, and a damaged record is not a crash
    assert recorded_recipe({"training": None}) is None and recipe_mismatch({}, served) == ""
    assert recorded_recipe({"training": {"quantization": {"method": "gptq"}}}) is None


def test_base_resolution_is_one_rule(registry: Registry, tiny_base, tmp_path):
    by_name = registry.resolve_base(tiny_base.name)
    assert (by_name.name, by_name.fingerprint, by_name.registered) == (
        tiny_base.name, tiny_base.fingerprint, True)
    copy = shutil.copytree(tiny_base.path, tmp_path / "my-model")
    by_path = registry.resolve_base(str(copy))
    assert (by_path.name, by_path.path, by_path.registered) == ("my-model", copy.resolve(), False)
    assert by_path.fingerprint == tiny_base.fingerprint
    with pytest.raises(NotFoundError, match=re.escape(f"unknown base 'nope'; known bases: {tiny_base.name}")):
        registry.resolve_base("nope")
    with pytest.raises(NotFoundError, match="no such model directory"):
        registry.resolve_base(str(tmp_path / "missing" / "dir"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidBaseError, match=r"no config\.json"):
        registry.resolve_base(str(tmp_path / "empty"))


def test_device_rule():
    assert device_name("auto", cuda_available=False) == "cpu"
    assert device_name("auto", cuda_available=True, local_rank=2) == "cuda:2"
    assert device_name("cuda", cuda_available=True, local_rank=1) == "cuda:1"
    assert device_name("cuda:3", cuda_available=True) == "cuda:3"
    with pytest.raises(ValueError, match="device 'cuda:0' asked for, but no CUDA device"):
        device_name("cuda:0", cuda_available=False)


def test_field_docs_read_the_string_under_each_field():
    @dataclasses.dataclass
    class Knobs:
        width: int = 1
        """How wide,
        in cells."""

        depth: int = 2

    assert field_docs(Knobs) == {"width": "How wide, in cells.", "depth": ""}
