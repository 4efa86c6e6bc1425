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
from loradock.runtime.lora_ops import reference_lora  # noqa: E402

from tests.runtime.test_lora_ops import CASES, make_batch, stacked_weights  # noqa: E402


@pytest.mark.parametrize(("seq_slots", "chunk_lens"), CASES)
@pytest.mark.parametrize("rank", [16, 5])  # 5: a rank slice of the buffers, as layers pass them
def test_triton_op_matches_reference(seq_slots, chunk_lens, rank):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shrink, expand = stacked_weights(5, [4, 8, 16, 2], 16, 40, 24, seed=len(seq_slots))
    shrink, expand = shrink[:, :rank].to(device), expand[:, :rank].to(device)  # strided views
    batch = make_batch(seq_slots, chunk_lens, device)
    x = torch.randn(sum(chunk_lens), 40, generator=torch.Generator().manual_seed(1)).to(device)
    want = reference_lora(x, shrink, expand, batch, batch.slots_present)
    got = triton_lora.triton_lora(x, shrink, expand, batch, batch.slots_present)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    zero_rows = batch.token_slots == 0
    assert torch.all(got[zero_rows] == 0), "tokens without an adapter get no delta"


def test_long_runs_span_several_token_blocks():
    """A 40-token prompt chunk needs three BLOCK_M=16 programs; the last one is partial."""
    shrink, expand = stacked_weights(3, [8, 8], 8, 33, 70, seed=3)
    batch = make_batch([1, 2], [40, 1])
    x = torch.randn(41, 33, generator=torch.Generator().manual_seed(2))
    want = reference_lora(x, shrink, expand, batch, batch.slots_present)
    torch.testing.assert_close(triton_lora.triton_lora(x, shrink, expand, batch, batch.slots_present), want,
                               rtol=1e-4, atol=1e-4)
