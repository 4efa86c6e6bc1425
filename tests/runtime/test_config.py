"""EngineConfig validation and its field documentation (the server's --help)."""

from __future__ import annotations

import dataclasses

import pytest
from loradock.runtime import EngineConfig


@pytest.mark.parametrize(("overrides", "message"), [
    ({"quantize": "fp16"}, "quantize='fp16'"),
    ({"device": "tpu"}, "device='tpu'"),
    ({"lora_ops": "magic"}, "lora_ops='magic'"),
    ({"max_slots": 0}, "max_slots=0"),
    ({"max_rank": -4}, "max_rank=-4"),
    ({"max_running": 64, "max_batch_tokens": 32}, "max_batch_tokens=32 must be >= max_running=64"),
    ({"max_prompt_tokens": 4096, "max_model_len": 2048}, "max_prompt_tokens=4096 must be < max_model_len"),
    ({"kv_cache_tokens": 100}, "kv_cache_tokens=100 must be >= max_model_len"),
    ({"registry_poll_s": -1}, "registry_poll_s"),
    ({"base": " "}, "base"),
])
def test_bad_values_are_named(overrides, message):
    with pytest.raises(ValueError, match="invalid engine config") as info:
        EngineConfig(**{"base": "tiny", **overrides})
    assert message in str(info.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ValueError) as info:
        EngineConfig(base="tiny", quantize="x", max_slots=0, lora_ops="y")
    assert all(p in str(info.value) for p in ("quantize", "max_slots", "lora_ops"))


def test_every_field_is_documented():
    docs = EngineConfig.field_docs()
    assert set(docs) == {f.name for f in dataclasses.fields(EngineConfig)}
    assert all(len(text) > 15 for text in docs.values()), docs


def test_every_lora_op_is_accepted():
    """Each op runtime/lora_ops.py serves can be asked for by name (its names are the config's)."""
    from loradock.runtime.lora_ops import LORA_OPS

    assert "gathered" in LORA_OPS  # the op that the config's copy of the list once missed
    for name in LORA_OPS:
        assert EngineConfig(base="tiny", lora_ops=name).lora_ops == name


def test_an_unknown_lora_op_is_refused_naming_the_choices():
    from loradock.runtime.lora_ops import LORA_OPS

    with pytest.raises(ValueError) as info:
        EngineConfig(base="tiny", lora_ops="fused")
    assert str(info.value) == ("invalid engine config: lora_ops='fused': expected one of "
                               + ", ".join(LORA_OPS))


def test_the_lora_op_names_need_no_torch():
    """The CLI builds --lora-ops from the config without importing torch."""
    import subprocess
    import sys

    code = ("import sys; from loradock.runtime import config; "
            "assert 'gathered' in config.LORA_OPS; assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
