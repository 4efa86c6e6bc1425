"""The paged attention kernel against its reference (the spec), and the reference against SDPA.
Without a GPU the kernel runs under Triton's CPU interpreter (tests/conftest.py), so its paging,
masking, windows and soft-capping are checked on every machine where Triton is installed; on a
GPU (`make gpu-check` selects the `cuda` mark) the compiled kernel runs."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
pytestmark = pytest.mark.cuda

from loradock.runtime.triton_attention import (  # noqa: E402
    PagedSeqs,
    paged_attention,
    paged_seqs,
    reference_paged_attention,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# (cached, new) per sequence: decode tokens, a prompt from the start, a chunk after a cached
# prefix, one sequence of many blocks; packed in this order.
DECODE_ONLY = [(0, 1), (37, 1), (5, 1), (130, 1)]
MIXED = [(12, 1), (0, 23), (40, 17), (3, 1), (70, 1)]
LONG_CHUNK = [(100, 90)]


def make_step(seqs: list[tuple[int, int]], heads: int, kv_heads: int, head_dim: int, block_size: int,
              dtype: torch.dtype = torch.float32, seed: int = 0):
    """Random queries and a random pool whose blocks are handed out shuffled (so a table's blocks
    are never adjacent), with the null block 0 zero as in the engine."""
    g = torch.Generator().manual_seed(seed)
    blocks_needed = [-(-(c + n) // block_size) for c, n in seqs]
    free = list(range(1, sum(blocks_needed) + 3))
    random.Random(seed).shuffle(free)
    width = max(blocks_needed)
    tables = []
    for need in blocks_needed:
        tables.append([free.pop() for _ in range(need)] + [0] * (width - need))
    slots = (len(free) + sum(blocks_needed) + 1) * block_size
    k_pool = torch.randn(slots, kv_heads, head_dim, generator=g).to(DEVICE, dtype)
    v_pool = torch.randn(slots, kv_heads, head_dim, generator=g).to(DEVICE, dtype)
    k_pool[:block_size] = 0
    v_pool[:block_size] = 0
    starts = [0]
    for _, n in seqs[:-1]:
        starts.append(starts[-1] + n)
    tokens = starts[-1] + seqs[-1][1]
    # [heads, T, d] transposed, as transformers hands attention its query (non-contiguous rows)
    q = torch.randn(heads, tokens, head_dim, generator=g).to(DEVICE, dtype).transpose(0, 1)
    batch = paged_seqs(starts, [c for c, _ in seqs], [n for _, n in seqs],
                       torch.tensor(tables, device=DEVICE), block_size)
    return q, k_pool, v_pool, batch


@pytest.mark.parametrize("seqs", [DECODE_ONLY, MIXED, LONG_CHUNK], ids=["decode", "mixed", "long-chunk"])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 4, 32), (9, 3, 64), (8, 2, 40)],
                         ids=["mha", "gqa3", "gqa4-d40"])
@pytest.mark.parametrize("block_size", [16, 4])
def test_kernel_matches_the_reference(seqs, heads, kv_heads, head_dim, block_size):
    q, k_pool, v_pool, batch = make_step(seqs, heads, kv_heads, head_dim, block_size)
    want = reference_paged_attention(q, k_pool, v_pool, batch, scale=0.1)
    got = paged_attention(q, k_pool, v_pool, batch, scale=0.1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("window", [1, 7, 64])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_windows_and_soft_capping_match_the_reference(window, softcap):
    """Windows shorter than a tile, spanning tiles and blocks, starting one key before a tile
    (queries at 69 and 126: first keys 63); a soft cap that bites (scores of ~10 capped at 2)."""
    q, k_pool, v_pool, batch = make_step([*MIXED, (69, 1), (126, 1)], 6, 2, 32, 8)
    want = reference_paged_attention(q, k_pool, v_pool, batch, scale=1.0, window=window, softcap=softcap)
    got = paged_attention(q, k_pool, v_pool, batch, scale=1.0, window=window, softcap=softcap)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    if window == 1:  # each query sees only its own key: the output is that key's value
        for start, new, cached in batch.seqs.tolist():
            pos = torch.arange(cached, cached + new)
            slots = batch.tables[batch.seqs[:, 0].tolist().index(start)].long()[pos // 8] * 8 + pos % 8
            own = v_pool[slots].repeat_interleave(3, dim=1)
            torch.testing.assert_close(got[start:start + new], own, rtol=1e-5, atol=1e-5)


def test_reference_equals_sdpa_over_gathered_keys():
    """The spec is causal attention as SDPA computes it over each sequence's keys in order."""
    q, k_pool, v_pool, batch = make_step(MIXED, 8, 2, 32, 4)
    got = reference_paged_attention(q, k_pool, v_pool, batch)
    for (start, new, cached), table in zip(batch.seqs.tolist(), batch.tables.long(), strict=True):
        keys = torch.arange(cached + new, device=DEVICE)
        slots = table[keys // 4] * 4 + keys % 4
        mask = keys[None, :] <= cached + torch.arange(new, device=DEVICE)[:, None]
        want = F.scaled_dot_product_attention(
            q[start:start + new].transpose(0, 1)[None], k_pool[slots].transpose(0, 1)[None],
            v_pool[slots].transpose(0, 1)[None], attn_mask=mask, enable_gqa=True)[0].transpose(0, 1)
        torch.testing.assert_close(got[start:start + new], want, rtol=1e-5, atol=1e-5)


def test_padding_rows_of_a_captured_step_read_only_the_null_block():
    """A captured decode step's padding rows are sequences of one token on the null block: they
    attend to zeros (output zero) and never read another sequence's blocks."""
    q, k_pool, v_pool, batch = make_step([(9, 1), (0, 1), (0, 1)], 4, 2, 32, 16)
    tables = batch.tables.clone()
    tables[1:] = 0  # rows 1 and 2: padding
    padded = PagedSeqs(tables, batch.seqs, 1, 16)
    got = paged_attention(q, k_pool, v_pool, padded)
    assert torch.all(got[1:] == 0)
    torch.testing.assert_close(got, reference_paged_attention(q, k_pool, v_pool, padded), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 tensor-core path: needs a CUDA device")
def test_bf16_is_within_bf16_rounding_of_the_spec():
    q, k_pool, v_pool, batch = make_step(MIXED, 32, 8, 128, 16, dtype=torch.bfloat16)
    want = reference_paged_attention(q.float(), k_pool.float(), v_pool.float(), batch)
    got = paged_attention(q, k_pool, v_pool, batch)
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() <= 0.02 * want.abs().max()
