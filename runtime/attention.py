"""Packed ragged attention over per-sequence KV caches, plugged into transformers.

Registered with `AttentionInterface.register(ATTENTION_NAME, ...)` and selected with
`attn_implementation=ATTENTION_NAME`. One engine step calls the model once on a
packed row of every sequence's new tokens; transformers computes q/k/v (with
RoPE from our position ids) and hands them here. For each sequence we append its
new K/V to its own cache (`module.layer_idx`) and run causal SDPA over that
sequence alone, so sequences never see each other. No 4D mask is ever built: the
name is not registered as a mask function, so transformers passes
`attention_mask=None`.

Outside a loradock step (no batch context) it behaves as plain SDPA, so the model
stays usable on its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .batch_context import current_context

ATTENTION_NAME = "loradock"


def _causal_offset_mask(n: int, total: int, device: torch.device) -> torch.Tensor:
    """[n, total] bool: query i (at position total - n + i) sees keys 0..total - n + i."""
    q_pos = torch.arange(total - n, total, device=device)[:, None]
    k_pos = torch.arange(total, device=device)[None, :]
    return k_pos <= q_pos


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [1, heads, T, d], key/value [1, kv_heads, T, d] -> ([1, T, heads, d], None)."""
    ctx = current_context()
    if ctx is None or not ctx.seqs:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      scaling=scaling, dropout=dropout, **kwargs)
    layer = module.layer_idx
    gqa = query.shape[1] != key.shape[1]
    outputs = []
    for span in ctx.seqs:
        q = query[:, :, span.start:span.end]  # [1, heads, n, d]
        k_all, v_all = span.kv.write(layer, key[0, :, span.start:span.end], value[0, :, span.start:span.end])
        n, total = q.shape[2], k_all.shape[1]
        if n == 1:
            mask, causal = None, False
        elif n == total:
            mask, causal = None, True
        else:  # a later prefill chunk: causal, offset by the cached prefix
            mask, causal = _causal_offset_mask(n, total, q.device), False
        out = F.scaled_dot_product_attention(
            q, k_all[None], v_all[None], attn_mask=mask, is_causal=causal, scale=scaling, enable_gqa=gqa,
        )
        outputs.append(out)
    attn = torch.cat(outputs, dim=2)  # [1, heads, T, d]
    return attn.transpose(1, 2).contiguous(), None


_registered = False


def register_attention() -> None:
    """Make `attn_implementation="loradock"` available to transformers (idempotent)."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTENTION_NAME, packed_attention)
        _registered = True
