"""The Triton LoRA kernels against the reference op (the spec). Without a GPU they run under
Triton's CPU interpreter, so the kernels' indexing and masking are checked on every machine
where Triton is installed; on a GPU (`make gpu-check` selects the `cuda` mark) the compiled
kernels run."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")  # without a GPU: under the interpreter (tests/conftest.py)
pytestmark = pytest.mark.cuda

from loradock.runtime import triton_lora  # noqa: E402
from loradock.runtime.lora_ops import apply_bias_and_dora, cuda_auto_lora, reference_lora  # noqa: E402

from tests.runtime.test_lora_ops import (  # noqa: E402
    CASES,
    case_weights,
    make_batch,
    stacked_weights,
    static_batch,
)

# MIN_SPLIT_K for the tests' 40 inputs: 512 (the default) splits nothing, 16 makes two chunks of
# one 32-wide tile each (an empty chunk: test_a_split_shrink_is_partial_sums_over_chunks_of_k).
SPLIT_K = {"whole-k": 512, "split-k": 16}


@pytest.fixture(params=list(SPLIT_K))
def split_k(request, monkeypatch):
    monkeypatch.setattr(triton_lora, "MIN_SPLIT_K", SPLIT_K[request.param])
    return request.param


@pytest.mark.parametrize(("seq_slots", "chunk_lens"), CASES)
# rank 5: a rank slice of the buffers, as layers pass them
@pytest.mark.parametrize(("rank", "split_k"), [(16, "whole-k"), (5, "whole-k"), (16, "split-k")], indirect=["split_k"])
def test_triton_op_matches_reference(seq_slots, chunk_lens, rank, split_k):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shrink, expand = case_weights(seq_slots, 40, 24)
    shrink, expand = shrink[:, :rank].to(device), expand[:, :rank].to(device)  # strided views
    batch = make_batch(seq_slots, chunk_lens, device)
    x = torch.randn(sum(chunk_lens), 40, generator=torch.Generator().manual_seed(1)).to(device)
    want = reference_lora(x, shrink, expand, batch, batch.slots_present)
    got = triton_lora.triton_lora(x, shrink, expand, batch, batch.slots_present)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    zero_rows = batch.token_slots == 0
    assert torch.all(got[zero_rows] == 0), "tokens without an adapter get no delta"
    ranks = torch.tensor([0] + [min(rank, (4, 8, 16, 2)[i % 4]) for i in range(len(shrink) - 1)],
                         dtype=torch.int32, device=device)  # each slot's rank, as the layer keeps them
    ranked = triton_lora.triton_lora(x, shrink, expand, batch, batch.slots_present, ranks)
    torch.testing.assert_close(ranked, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("seq_slots", "chunk_lens"), CASES)
def test_cuda_auto_op_matches_reference(seq_slots, chunk_lens):
    """CUDA's "auto" (bmm for decode-only steps, Triton with prompt chunks) on every case."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shrink, expand = case_weights(seq_slots, 40, 24)
    shrink, expand = shrink.to(device), expand.to(device)
    batch = make_batch(seq_slots, chunk_lens, device)
    x = torch.randn(sum(chunk_lens), 40, generator=torch.Generator().manual_seed(1)).to(device)
    want = reference_lora(x, shrink, expand, batch, batch.slots_present)
    torch.testing.assert_close(cuda_auto_lora(x, shrink, expand, batch, batch.slots_present), want,
                               rtol=1e-4, atol=1e-4)


def test_a_split_shrink_is_partial_sums_over_chunks_of_k():
    """Split-K: each program sums one chunk of K into its own slice; the slices add up to the
    whole shrink, and a chunk past K (here the third of 3 over 4 tiles) holds zeros."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shrink, _ = stacked_weights(3, [8, 8], 8, 100, 12, seed=4)
    batch = make_batch([1, 2, 0], [1, 1, 1], device)
    x = torch.randn(3, 100, generator=torch.Generator().manual_seed(5)).to(device)
    whole = triton_lora.segmented_matmul(x, shrink.to(device), True, batch.run_table, batch.longest_run)
    parts = triton_lora.segmented_matmul(x, shrink.to(device), True, batch.run_table, batch.longest_run, splits=3)
    assert parts.shape == (3, 3, 8) and parts.dtype == torch.float32
    torch.testing.assert_close(parts.sum(0), whole, rtol=1e-5, atol=1e-5)
    assert parts[0, :2].abs().min() > 0 and parts[1, :2].abs().min() > 0 and torch.all(parts[2] == 0)
    assert torch.all(parts[:, 2] == 0), "slot 0 writes zeros in every chunk"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 tensor-core path: needs a CUDA device")
@pytest.mark.parametrize(("seq_slots", "chunk_lens"), CASES)
def test_triton_op_in_bf16_is_within_bf16_rounding_of_the_spec(seq_slots, chunk_lens, split_k):
    """bf16 buffers (the CUDA default) go to the tensor cores as bf16; the result stays within
    bf16 rounding of the fp32 reference on the same values."""
    shrink, expand = case_weights(seq_slots, 40, 24)
    shrink, expand = shrink.to("cuda", torch.bfloat16), expand.to("cuda", torch.bfloat16)
    batch = make_batch(seq_slots, chunk_lens, torch.device("cuda"))
    x = torch.randn(sum(chunk_lens), 40, generator=torch.Generator().manual_seed(1)).to("cuda", torch.bfloat16)
    want = reference_lora(x.float(), shrink.float(), expand.float(), batch, batch.slots_present)
    got = triton_lora.triton_lora(x, shrink, expand, batch, batch.slots_present)
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() <= 0.02 * want.abs().max()


def test_long_runs_span_several_token_blocks():
    """A 40-token prompt chunk needs three BLOCK_M=16 programs; the last one is partial."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shrink, expand = stacked_weights(3, [8, 8], 8, 33, 70, seed=3)
    shrink, expand = shrink.to(device), expand.to(device)
    batch = make_batch([1, 2], [40, 1], device)
    x = torch.randn(41, 33, generator=torch.Generator().manual_seed(2)).to(device)
    want = reference_lora(x, shrink, expand, batch, batch.slots_present)
    torch.testing.assert_close(triton_lora.triton_lora(x, shrink, expand, batch, batch.slots_present), want,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("seq_slots", "chunk_lens"), CASES)
@pytest.mark.parametrize(("runs", "split_k"), [("eager", "whole-k"), ("static", "whole-k"), ("static", "split-k")],
                         indirect=["split_k"])
@pytest.mark.parametrize("base_bias", [False, True])
def test_fused_rows_match_the_reference_composition(seq_slots, chunk_lens, runs, base_bias, split_k):
    """`triton_lora_into` (a captured step's op on CUDA) adds delta, LoRA bias and DoRA rows into
    the base output as the expand kernel stores: equal to the reference op, then
    `apply_bias_and_dora`. Slot 1 has both rows, 2 neither, 3 a bias, 4 a DoRA scale; rows of
    tokens without an adapter are left exactly as they were; slots past 4 have both."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(7 + len(seq_slots))
    shrink, expand = case_weights(seq_slots, 40, 24)
    bias, dora = torch.randn(len(shrink), 24, generator=g), 0.5 * torch.randn(len(shrink), 24, generator=g)
    bias[[0, 2, 4]], dora[[0, 2, 3]] = 0, 0
    tokens = sum(chunk_lens)
    x = torch.randn(tokens, 40, generator=g)
    base_out = torch.randn(tokens, 24, generator=g)
    b0 = torch.randn(24, generator=g) if base_bias else None
    spec = make_batch(seq_slots, chunk_lens)
    want = apply_bias_and_dora(base_out + reference_lora(x, shrink, expand, spec, spec.slots_present),
                               spec.token_slots, bias, dora, b0)
    batch = make_batch(seq_slots, chunk_lens, device)
    batch = static_batch(batch) if runs == "static" else batch
    on = [t.to(device) if t is not None else None for t in (base_out, x, shrink, expand, bias, dora, b0)]
    out = on[0].clone()
    got = triton_lora.triton_lora_into(out, *on[1:4], batch, *on[4:])
    assert got is out, "written into the base output"
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
    untouched = spec.token_slots == 0
    assert torch.equal(got.cpu()[untouched], base_out[untouched])


@pytest.mark.parametrize(("seq_slots", "chunk_lens"), CASES)
@pytest.mark.parametrize("runs", ["eager", "static"])
def test_the_static_op_reads_each_slot_to_its_own_rank(seq_slots, chunk_lens, runs):
    """With the slots' ranks, `triton_lora_into` reads only each adapter's rank of the padded
    buffers: rows past a slot's rank are filled with noise here, and the answer is still the
    spec's on the zero-padded weights (a kernel that read them would differ by far more)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(11 + len(seq_slots))
    shrink, expand = case_weights(seq_slots, 40, 24)
    ranks = torch.tensor([0] + [(4, 8, 16, 2)[i % 4] for i in range(len(shrink) - 1)], dtype=torch.int32)
    noisy_shrink, noisy_expand = shrink.clone(), expand.clone()
    for s, r in enumerate(ranks.tolist()):
        if s:  # slot 0 stays zero: it is "no adapter", whatever its rank entry
            noisy_shrink[s, r:] = torch.randn(shrink.shape[1] - r, 40, generator=g)
            noisy_expand[s, r:] = torch.randn(expand.shape[1] - r, 24, generator=g)
    zeros = torch.zeros(len(shrink), 24)
    tokens = sum(chunk_lens)
    x, base_out = torch.randn(tokens, 40, generator=g), torch.randn(tokens, 24, generator=g)
    spec = make_batch(seq_slots, chunk_lens)
    want = base_out + reference_lora(x, shrink, expand, spec, spec.slots_present)
    batch = make_batch(seq_slots, chunk_lens, device)
    batch = static_batch(batch) if runs == "static" else batch
    on = [t.to(device) for t in (base_out, x, noisy_shrink, noisy_expand, zeros, zeros, ranks)]
    got = triton_lora.triton_lora_into(on[0].clone(), *on[1:4], batch, on[4], on[5], None, on[6])
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("seq_slots", "chunk_lens"), CASES)
@pytest.mark.parametrize(("members", "split_k"), [(2, "whole-k"), (3, "whole-k"), (3, "split-k")],
                         indirect=["split_k"])
def test_one_launch_shrinks_the_layers_that_share_an_input(seq_slots, chunk_lens, members, split_k):
    """`grouped_shrink` (q/k/v or gate/up in one launch) gives each member what its own shrink
    gives, each slot read to that member's rank (noise past it)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(5 + len(seq_slots))
    batch = static_batch(make_batch(seq_slots, chunk_lens, device))
    x = torch.randn(sum(chunk_lens), 40, generator=g)
    shrinks, ranks, wants = [], [], []
    for j in range(members):
        shrink, _ = case_weights(seq_slots, 40, 24)
        rank = torch.tensor([0] + [(2, 16, 8, 4)[(i + j) % 4] for i in range(len(shrink) - 1)], dtype=torch.int32)
        shrink = torch.randn(shrink.shape, generator=g)
        clean = shrink.clone()
        for s, r in enumerate(rank.tolist()):
            clean[s, r:] = 0  # what the slot holds; the noise past it must not be read
        shrink[0] = clean[0] = 0
        wants.append(triton_lora.segmented_matmul(x.to(device), clean.to(device), True, batch.run_table,
                                                  batch.longest_run).cpu())  # unsplit
        shrinks.append(shrink.to(device))
        ranks.append(rank.to(device))
    got = triton_lora.grouped_shrink(x.to(device), shrinks, batch, ranks)
    for j in range(members):
        partials = got[j] if got[j].dim() == 3 else got[j][None]
        assert len(partials) == {"whole-k": 1, "split-k": 2}[split_k]
        torch.testing.assert_close(partials.sum(0).cpu(), wants[j], rtol=1e-4, atol=1e-4)


def test_siblings_share_one_shrink_launch_in_a_static_step(monkeypatch):
    """q/k/v wrapped by `wrap_linears` form an `InputGroup`: in a static step on the Triton op the
    first of them makes all three shrinks in one launch; each output equals its own static op."""
    from loradock.runtime import lora_layer
    from loradock.runtime.batch_context import BatchContext, use_context
    from torch import nn

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = nn.Linear(40, 24), nn.Linear(40, 8), nn.Linear(40, 8)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = Attention()

        def get_output_embeddings(self) -> None:
            return None

    torch.manual_seed(0)
    model = Model()
    monkeypatch.setattr(lora_layer, "pick_static_op", lambda device: triton_lora.triton_lora_into)
    layers = lora_layer.wrap_linears(model, 5, 16, torch.float32, torch.device("cpu"), "auto")
    q, k, v = (layers[f"attn.{n}"] for n in ("q_proj", "k_proj", "v_proj"))
    assert q.group is k.group is v.group is not None
    g = torch.Generator().manual_seed(3)
    for i, layer in enumerate((q, k, v)):
        for slot, rank in ((1, 4), (2, 16), (3, 2 + i)):
            layer.set_slot(slot, torch.randn(rank, 40, generator=g), torch.randn(rank, layer.out_features, generator=g))
    batch = static_batch(make_batch([1, 3, 0, 2, 1], [1, 1, 1, 1, 1]))
    x = torch.randn(5, 40, generator=g)
    launches = {"grouped": 0, "single": 0}
    real_grouped, real_single = triton_lora.grouped_shrink, triton_lora.segmented_matmul

    def grouped(*args, **kwargs):
        launches["grouped"] += 1
        return real_grouped(*args, **kwargs)

    def single(*args, **kwargs):
        launches["single"] += 1
        return real_single(*args, **kwargs)

    monkeypatch.setattr(lora_layer, "grouped_shrink", grouped)
    monkeypatch.setattr(triton_lora, "segmented_matmul", single)
    with use_context(BatchContext(batch, None)):
        got = [layer(x) for layer in (q, k, v)]
    assert launches == {"grouped": 1, "single": 3}, launches  # one shared shrink, three expands
    for layer, out in zip((q, k, v), got, strict=True):
        want = triton_lora.triton_lora_into(layer.base_layer(x), x, layer.lora_shrink, layer.lora_expand, batch,
                                            layer.lora_bias, layer.lora_dora_scale, layer.base_layer.bias)
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    assert q.group._input is None  # nothing held once every member took its shrink
