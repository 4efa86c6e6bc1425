"""`runtime/adapter_merge.py` against PEFT's own `add_weighted_adapter`, tensor for tensor."""

from __future__ import annotations

import math

import pytest
import torch
from loradock.runtime.adapter_merge import (
    MergeError,
    MergeInput,
    MergeRecipe,
    merge_adapters,
    module_order,
    read_peft_dir,
)
from peft.utils import get_peft_model_state_dict

from tests.runtime.conftest import load_peft_oracle

# (strategy, adapters, density): equal-rank strategies get rank-8 adapters with different
# targets (the merge covers the union); cat and svd get ranks 8 and 16.
CASES = [
    ("linear", ("med", "poem", "bio"), None),
    ("ties", ("med", "poem", "bio"), 0.5),
    ("dare_linear", ("med", "poem", "bio"), 0.6),
    ("dare_ties", ("med", "poem", "bio"), 0.6),
    ("cat", ("med", "chem"), None),
    ("svd", ("med", "chem"), None),
]
WEIGHTS = (0.7, 0.3, 1.2)


@pytest.fixture(scope="module")
def peft_model(tiny_base, tiny_adapter_dirs):
    return load_peft_oracle(tiny_base.path, tiny_adapter_dirs, "none")


def peft_merge(model, names, strategy, density, seed) -> tuple[dict, dict, torch.Tensor]:
    """PEFT's merge as (config, state dict) and the RNG state its DARE masks start from: PEFT
    draws them from the global RNG right after initialising the new adapter, which a `linear`
    merge of the same adapters (same rank and targets, no random draws) reproduces."""
    weights = list(WEIGHTS[:len(names)])
    torch.manual_seed(seed)
    if strategy.startswith("dare"):
        model.add_weighted_adapter(list(names), weights, f"probe-{strategy}", combination_type="linear")
    masks_from = torch.get_rng_state()
    torch.manual_seed(seed)
    model.add_weighted_adapter(list(names), weights, f"m-{strategy}", combination_type=strategy,
                               density=density)
    state = get_peft_model_state_dict(model, adapter_name=f"m-{strategy}")
    return model.peft_config[f"m-{strategy}"], state, masks_from


@pytest.mark.parametrize(("strategy", "names", "density"), CASES, ids=[c[0] for c in CASES])
def test_merge_equals_peft_add_weighted_adapter(peft_model, tiny_base, tiny_adapter_dirs, strategy, names,
                                                density):
    config, expected, masks_from = peft_merge(peft_model, names, strategy, density, seed=11)
    inputs = [read_peft_dir(n, tiny_adapter_dirs[n]) for n in names]
    order = [n.removeprefix("base_model.model.") for n, _ in peft_model.named_modules()
             if n.endswith("_proj") and ".lora_" not in n]
    generator = torch.Generator()
    generator.set_state(masks_from)
    recipe = MergeRecipe(WEIGHTS[:len(names)], strategy, density)
    merged_config, merged = merge_adapters(inputs, recipe, module_order=order, generator=generator)

    assert merged_config["r"] == config.r and merged_config["lora_alpha"] == config.lora_alpha
    assert sorted(merged) == sorted(expected)
    for key, tensor in expected.items():
        torch.testing.assert_close(merged[key], tensor, rtol=1e-5, atol=1e-6, msg=key)
    # the merge is not one of its inputs (the comparison above could not pass by accident)
    first = inputs[0].tensors
    key = next(k for k in first if k.endswith("lora_B.weight") and k in merged)
    assert first[key].shape != merged[key].shape or not torch.allclose(first[key], merged[key])


def test_dare_is_reproducible_from_its_seed(tiny_adapter_dirs):
    inputs = [read_peft_dir(n, tiny_adapter_dirs[n]) for n in ("med", "bio")]
    one = merge_adapters(inputs, MergeRecipe((0.5, 0.5), "dare_linear", 0.5, seed=3))[1]
    two = merge_adapters(inputs, MergeRecipe((0.5, 0.5), "dare_linear", 0.5, seed=3))[1]
    other = merge_adapters(inputs, MergeRecipe((0.5, 0.5), "dare_linear", 0.5, seed=4))[1]
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert any(not torch.equal(one[k], other[k]) for k in one)


@pytest.mark.parametrize(("names", "recipe", "expected"), [
    (("med", "chem"), MergeRecipe((0.5, 0.5), "linear"), "needs adapters of equal rank (med r=8, chem r=16)"),
    (("med", "bio"), MergeRecipe((0.5, -0.5)), "weights must be finite numbers > 0, got -0.5"),
    (("med", "bio"), MergeRecipe((0.5, math.nan)), "got nan"),
    (("med", "bio"), MergeRecipe((0.5,)), "1 weights for 2 adapters"),
    (("med", "bio"), MergeRecipe((0.5, 0.5), "ties"), "strategy ties needs a density in (0, 1], got None"),
    (("med", "bio"), MergeRecipe((0.5, 0.5), "linear", 0.5), "density applies to"),
    (("med", "bio"), MergeRecipe((0.5, 0.5), "mean"), "unknown strategy 'mean'"),
])
def test_bad_recipes_are_refused_naming_the_problem(tiny_adapter_dirs, names, recipe, expected):
    inputs = [read_peft_dir(n, tiny_adapter_dirs[n]) for n in names]
    with pytest.raises(MergeError, match="cannot merge") as err:
        merge_adapters(inputs, recipe)
    assert expected in str(err.value)


def test_adapters_of_different_bases_are_refused(tiny_adapter_dirs):
    a, b = (read_peft_dir(n, tiny_adapter_dirs[n]) for n in ("med", "bio"))
    a = MergeInput("med@1", a.config, a.tensors, "f" * 64)
    b = MergeInput("bio@2", b.config, b.tensors, "e" * 64)
    with pytest.raises(MergeError, match=r"different bases \(bio@2 on base eeeeeeeeeeee, med@1 on base ffff"):
        merge_adapters([a, b], MergeRecipe((1.0, 1.0)))


def test_dora_inputs_are_refused(tiny_adapter_dirs):
    a, b = (read_peft_dir(n, tiny_adapter_dirs[n]) for n in ("med", "bio"))
    dora = MergeInput("med@1", {**a.config, "use_dora": True}, a.tensors)
    with pytest.raises(MergeError, match="med@1 sets use_dora: merging covers plain LoRA weights only"):
        merge_adapters([dora, b], MergeRecipe((1.0, 1.0)))


def test_cli_merge_publishes_the_merge_with_its_lineage(tiny_registry, tiny_adapter_dirs, capsys):
    from loradock.cli import main

    rc = main(["adapters", "merge", "med@1", "bio", "--weights", "0.7,0.3", "--strategy", "dare_ties",
               "--density", "0.5", "--seed", "5", "--name", "medbio", "--alias", "prod"])
    assert rc == 0, capsys.readouterr().err
    assert capsys.readouterr().out.strip() == "medbio@1"
    version = tiny_registry.resolve("medbio@prod")
    med, bio = tiny_registry.resolve("med@1"), tiny_registry.resolve("bio@1")
    assert version.manifest["parents"] == [{"ref": "med@1", "digest": med.digest, "weight": 0.7},
                                           {"ref": "bio@1", "digest": bio.digest, "weight": 0.3}]
    assert version.manifest["source"] == {"kind": "merge", "strategy": "dare_ties", "density": 0.5,
                                          "majority_sign_method": "total", "seed": 5}
    card = (version.path / "README.md").read_text()
    assert "merged with strategy dare_ties from med@1 (weight 0.7), bio@1" in card
    stored = read_peft_dir("medbio@1", version.path).tensors
    _, expected = merge_adapters([read_peft_dir(n, tiny_adapter_dirs[n]) for n in ("med", "bio")],
                                 MergeRecipe((0.7, 0.3), "dare_ties", 0.5, seed=5),
                                 module_order=module_order(tiny_registry.base(med.manifest["base"]["name"]).path))
    assert sorted(stored) == sorted(expected)
    assert all(torch.equal(stored[k], expected[k]) for k in expected)


def test_cli_merge_signs_the_new_version_with_sign_key(tiny_registry, tmp_path, capsys):
    """Guards against `--sign-key` being accepted by merge but not passed to the publish."""
    from loradock.registry.signing import SIGNATURE_FILE

    from loradock.cli import main
    from tests.signing_keys import make_key_pair

    private, _public = make_key_pair(tmp_path, "team")
    rc = main(["adapters", "merge", "med@1", "bio", "--weights", "0.5,0.5", "--name", "signedmix",
               "--sign-key", str(private)])
    assert rc == 0, capsys.readouterr().err
    version = tiny_registry.resolve("signedmix@1")
    assert (version.path / SIGNATURE_FILE).is_file()
    assert version.manifest["signature"]["signer"]


@pytest.mark.parametrize(("argv", "expected"), [
    (["med@1", "nosuch", "--weights", "1,1"], "nosuch"),
    (["med@1", "chem@1", "--weights", "1,1"], "needs adapters of equal rank (med@1 r=8, chem@1 r=16)"),
    (["med@1", "bio@1", "--weights", "1,-1"], "weights must be finite numbers > 0, got -1.0"),
    (["med@1", "bio@1", "--weights", "1,nan"], "got nan"),
    (["med@1", "bio@1", "--weights", "1,x"], "expected comma-separated numbers"),
    (["med@1", "bio@1", "--weights", "1,1", "--strategy", "ties"], "needs a density"),
])
def test_cli_merge_refuses_bad_input_and_publishes_nothing(tiny_registry, capsys, argv, expected):
    from loradock.cli import main

    assert main(["adapters", "merge", *argv, "--name", "merged"]) == 2
    err = capsys.readouterr().err
    assert expected in err
    if "nosuch" in argv:
        assert "med" in err  # the registry's list of what exists
    assert "merged" not in {v.name for v in tiny_registry.list()}
