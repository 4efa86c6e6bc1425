"""The paged KV pool and the attention over it, against per-sequence SDPA (the spec)."""

from __future__ import annotations

import random
import types

import pytest
import torch
import torch.nn.functional as F
from loradock.runtime.attention import paged_attention
from loradock.runtime.batch_context import BatchContext, use_context
from loradock.runtime.kv_cache import KVPool
from loradock.runtime.model_runner import StepItem, attention_batch, lora_batch


def test_pool_grows_all_or_nothing_and_reuses_freed_blocks():
    pool = KVPool(1, 1, 2, num_blocks=4, block_size=4, dtype=torch.float32, device=torch.device("cpu"))
    a, b = [], []
    assert pool.grow(a, 5) and len(a) == 2 and pool.free_blocks == 2
    assert pool.grow(a, 8) and len(a) == 2, "8 tokens still fit in two blocks of 4"
    assert not pool.grow(b, 9) and b == [] and pool.free_blocks == 2, "3 blocks asked, 2 free: none taken"
    assert pool.grow(b, 8) and pool.free_blocks == 0 and not set(a) & set(b)
    assert KVPool.NULL_BLOCK not in a + b, "the null block is never handed out"
    assert pool.used_tokens == 16
    pool.free(a)
    assert a == [] and pool.free_blocks == 2 and pool.grow(b, 12) and len(b) == 3


def reference_attention(q, k, v, scale):
    """One sequence: q [heads, n, d] at the end of k/v [kv_heads, total, d], causal."""
    n, total = q.shape[1], k.shape[1]
    mask = torch.arange(total)[None, :] <= torch.arange(total - n, total)[:, None]
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, scale=scale,
                                          enable_gqa=True)[0]  # [heads, n, d]


@pytest.mark.parametrize(("pasts", "chunks"), [
    ([5, 0, 17, 3], [1, 1, 1, 1]),  # decode tokens only
    ([0, 0], [7, 3]),  # first prompt chunks only
    ([9, 0, 33, 4, 0], [1, 6, 1, 5, 1]),  # decode tokens next to prompt chunks (and a later chunk)
])
def test_paged_attention_matches_per_sequence_sdpa(pasts, chunks):
    torch.manual_seed(0)
    heads, kv_heads, d, bs = 4, 2, 8, 4
    pool = KVPool(1, kv_heads, d, num_blocks=64, block_size=bs, dtype=torch.float32,
                  device=torch.device("cpu"))
    random.Random(0).shuffle(pool._free)  # sequences get scattered, interleaved blocks
    # Whatever a sequence did not write must never reach its attention, even NaN left in
    # uninitialised memory: padding reads the null block.
    pool.k[:, bs:], pool.v[:, bs:] = float("nan"), float("nan")
    past_k = [torch.randn(kv_heads, p, d) for p in pasts]
    past_v = [torch.randn(kv_heads, p, d) for p in pasts]
    tables = []
    for p, n, k, v in zip(pasts, chunks, past_k, past_v, strict=True):
        table: list[int] = []
        assert pool.grow(table, p + n)
        for pos in range(p):  # the sequence's cached tokens, written where its table says
            slot = table[pos // bs] * bs + pos % bs
            pool.k[0, slot], pool.v[0, slot] = k[:, pos], v[:, pos]
        tables.append(table)
    total = sum(chunks)
    q, k_new, v_new = torch.randn(1, heads, total, d), torch.randn(1, kv_heads, total, d), torch.randn(1, kv_heads, total, d)
    items = [StepItem(t, p, [0] * n, 0, True) for t, p, n in zip(tables, pasts, chunks, strict=True)]
    cu = [0]
    for n in chunks:
        cu.append(cu[-1] + n)
    ctx = BatchContext(lora=lora_batch([0] * total, torch.device("cpu")),
                       attention=attention_batch(pool, items, cu, torch.device("cpu")))
    assert len(ctx.attention.groups) == len({n == 1 for n in chunks}), "one call for decodes, one for chunks"
    with use_context(ctx):
        out, _ = paged_attention(types.SimpleNamespace(layer_idx=0), q, k_new, v_new, None, scaling=0.3)
    for i, (p, n) in enumerate(zip(pasts, chunks, strict=True)):
        s, e = cu[i], cu[i + 1]
        k_all = torch.cat([past_k[i], k_new[0, :, s:e]], dim=1)
        v_all = torch.cat([past_v[i], v_new[0, :, s:e]], dim=1)
        want = reference_attention(q[0, :, s:e], k_all, v_all, 0.3).transpose(0, 1)  # [n, heads, d]
        torch.testing.assert_close(out[0, s:e], want, atol=1e-5, rtol=0)
        for pos in range(p, p + n):  # the new keys were stored in the sequence's own blocks
            slot = tables[i][pos // bs] * bs + pos % bs
            torch.testing.assert_close(pool.k[0, slot], k_new[0, :, s + pos - p])
