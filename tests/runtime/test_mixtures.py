"""Per-request mixtures: a weighted merge of adapters, built once per recipe, cached like any
version and batched with plain adapters and the base; PeftModel with `add_weighted_adapter` is
the oracle."""

from __future__ import annotations

import pytest
import torch
from loradock.runtime import GenerationRequest, SamplingParams
from loradock.runtime.errors import AdapterNotFoundError, InvalidRequestError
from loradock.runtime.model_runner import StepItem
from loradock.runtime.types import AdapterMixture, MixtureComponent, ResolvedMixture

from tests.runtime.conftest import drive, load_peft_oracle, oracle_generate, oracle_logits

MIX = AdapterMixture((MixtureComponent("med", 0.7), MixtureComponent("poem@1", 0.3),
                      MixtureComponent("bio", 1.2)), strategy="ties", density=0.5)
PROMPTS = ([1, 450, 7043, 310, 3444, 338], [1, 822, 18755, 29898, 29876], [1, 15043, 29892, 590])


@pytest.fixture(scope="module")
def oracle(tiny_base, tiny_adapter_dirs):
    model = load_peft_oracle(tiny_base.path, {n: tiny_adapter_dirs[n] for n in ("med", "poem", "bio", "code")},
                             "none")
    model.add_weighted_adapter(["med", "poem", "bio"], [0.7, 0.3, 1.2], "mix", combination_type="ties",
                               density=0.5)
    return model


def test_a_mixture_in_one_batch_with_an_adapter_and_the_base_equals_peft(engine_factory, tiny_registry,
                                                                         tiny_base, oracle):
    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=False)
    key = engine.adapters.mixture_key(MIX)
    assert isinstance(key, ResolvedMixture) and [c.ref for c, _ in key.components] == ["med@1", "poem@1", "bio@1"]
    engine.cache.wait_ready(key)
    slots = [engine.cache.acquire(key), engine.cache.slot_of(engine.load_adapter("code")), 0]
    tables: list[list[int]] = [[] for _ in PROMPTS]
    for table, ids in zip(tables, PROMPTS, strict=True):
        assert engine.kv.grow(table, len(ids))
    step = engine.runner.forward([StepItem(t, 0, ids, s, True) for t, ids, s in zip(tables, PROMPTS, slots,
                                                                                    strict=True)])
    for table in tables:
        engine.kv.free(table)
    engine.cache.release(key)
    for i, (adapter, ids) in enumerate(zip(("mix", "code", None), PROMPTS, strict=True)):
        expected = oracle_logits(oracle, adapter, ids)[-1]
        torch.testing.assert_close(step.row(i).float(), expected, atol=1e-5, rtol=0, msg=str(adapter))
    # the mixture is none of its parts: the comparison above could fail
    for part in ("med", "bio"):
        assert not torch.allclose(oracle_logits(oracle, part, PROMPTS[0])[-1], step.row(0).float(), atol=1e-3)

    # the same through submit: greedy tokens per request, all three batched together
    handles = [engine.submit(GenerationRequest(mixture=MIX, prompt_token_ids=tuple(PROMPTS[0]),
                                               sampling=SamplingParams(max_new_tokens=4, ignore_eos=True))),
               engine.submit(GenerationRequest(adapter="code", prompt_token_ids=tuple(PROMPTS[1]),
                                               sampling=SamplingParams(max_new_tokens=4, ignore_eos=True))),
               engine.submit(GenerationRequest(prompt_token_ids=tuple(PROMPTS[2]),
                                               sampling=SamplingParams(max_new_tokens=4, ignore_eos=True)))]
    drive(engine, handles)
    results = [h.result() for h in handles]
    for result, adapter, ids in zip(results, ("mix", "code", None), PROMPTS, strict=True):
        assert list(result.token_ids) == oracle_generate(oracle, adapter, ids, 4)[:4]
    assert results[0].adapter == key and key.ref.startswith("mixture-")


def test_identical_recipes_share_one_cache_entry(engine_factory, tiny_registry, tiny_base):
    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=False)
    same = AdapterMixture((MixtureComponent("med@1", 0.7), MixtureComponent("poem", 0.3),
                           MixtureComponent("bio@1", 1.2)), strategy="ties", density=0.5, seed=99)
    other = AdapterMixture(MIX.components, strategy="ties", density=0.8)
    assert engine.adapters.mixture_key(same) == engine.adapters.mixture_key(MIX)  # seed: DARE only
    assert engine.adapters.mixture_key(other) != engine.adapters.mixture_key(MIX)
    handles = [engine.submit(GenerationRequest(mixture=m, prompt_token_ids=(1, 450, 7043),
                                               sampling=SamplingParams(max_new_tokens=2)))
               for m in (MIX, same, MIX)]
    drive(engine, handles)
    key = engine.adapters.mixture_key(MIX)
    assert {h.result().adapter for h in handles} == {key}
    assert engine.stats()["adapters"][key.ref]["loads"] == 1


def test_recipes_differing_only_in_weights_are_separate_entries_with_their_own_kv(
        engine_factory, tiny_registry, tiny_base):
    """Guards a cache key that leaves the weights out: the second recipe would be served the
    first's merged weights and its prefix-cached K/V."""
    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=False, kv_block_size=4)
    heavier = AdapterMixture((MixtureComponent("med", 1.4), *MIX.components[1:]), strategy="ties", density=0.5)
    light, heavy = engine.adapters.mixture_key(MIX), engine.adapters.mixture_key(heavier)
    assert light.ref != heavy.ref and light.digest != heavy.digest
    prompt = (1, 450, 7043, 310, 3444, 338, 822, 18755, 29898, 29876, 15043, 29892, 590)  # 3 full blocks

    def serve(mixture: AdapterMixture):
        handle = engine.submit(GenerationRequest(mixture=mixture, prompt_token_ids=prompt,
                                                 sampling=SamplingParams(max_new_tokens=2, ignore_eos=True)))
        drive(engine, [handle])
        return handle.result()

    assert serve(MIX).adapter == light
    assert serve(heavier).adapter == heavy
    stats = engine.stats()["adapters"]
    assert stats[light.ref]["loads"] == stats[heavy.ref]["loads"] == 1, "each recipe merged once"
    assert stats[heavy.ref]["cached_prompt_tokens"] == 0, "the second recipe got the first's K/V"
    serve(heavier)  # the same recipe again does reuse its own K/V: the check above could fail
    assert engine.stats()["adapters"][heavy.ref]["cached_prompt_tokens"] >= 12


@pytest.mark.parametrize(("mixture", "error", "expected"), [
    (AdapterMixture((MixtureComponent("med", 0.5), MixtureComponent("chem", 0.5))), InvalidRequestError,
     "needs adapters of equal rank (med@1 r=8, chem@1 r=16)"),
    (AdapterMixture((MixtureComponent("med", 0.5), MixtureComponent("bio", -1.0))), InvalidRequestError,
     "weights must be finite numbers > 0"),
    (AdapterMixture((MixtureComponent("med", 0.5), MixtureComponent("bio", 0.5)), strategy="dare_ties"),
     InvalidRequestError, "needs a density"),
    (AdapterMixture((MixtureComponent("med", 0.5), MixtureComponent("chem", 0.5), MixtureComponent("code", 1)),
                    strategy="cat"), InvalidRequestError, "rank 40, above this engine's max_rank 16"),
    (AdapterMixture((MixtureComponent("med", 0.5), MixtureComponent("nosuch", 0.5))), AdapterNotFoundError,
     "nosuch"),
])
def test_bad_mixtures_are_refused_at_submit(engine_factory, tiny_registry, tiny_base, mixture, error, expected):
    engine = engine_factory(tiny_registry, tiny_base.name, run_loop=False)
    with pytest.raises(error) as err:
        engine.submit(GenerationRequest(mixture=mixture, prompt_token_ids=(1, 2, 3)))
    assert expected in str(err.value)
    assert engine.stats()["waiting"] == 0
