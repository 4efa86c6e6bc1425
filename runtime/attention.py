"""Paged attention over the step's packed ragged batch, plugged into transformers.

Registered with `AttentionInterface.register(ATTENTION_NAME, ...)` and selected with
`attn_implementation=ATTENTION_NAME`. One engine step calls the model once on a
packed row of every sequence's new tokens; transformers computes q/k/v (with RoPE
from our position ids) and hands them here. Each layer writes the step's new K/V
into the paged pool with one `index_copy_`, then runs at most two SDPA calls whatever
the batch: one for all decode tokens, one for all prompt chunks. Each call gathers
its sequences' cached keys from the pool ([N, L] slot indices built once per step)
and masks what a query may not see (other sequences are never in its row; padding
and the future are masked; so are keys outside the layer's sliding window, whose
masks are built once per step too, one per window size the model has). No 4D mask
reaches transformers: the name is not registered as a mask function, so it passes
`attention_mask=None`.

With the triton backend (`pick_attention`), the step carries block tables instead of groups
(`AttentionBatch.paged`) and one kernel per layer reads the pool in place
(`triton_attention.py`); the K/V write is the same `index_copy_`.

Outside a loradock step (no batch context) it behaves as plain SDPA, so the model
stays usable on its own.
"""

from __future__ import annotations

import os
from functools import partial

import torch
import torch.nn.functional as F

from . import triton_attention
from .batch_context import current_context
from .triton_lora import available as triton_available

ATTENTION_NAME = "loradock"


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [1, heads, T, d], key/value [1, kv_heads, T, d] -> ([1, T, heads, d], None)."""
    if torch.compiler.is_compiling():  # the compiler sees one opaque op (compiled.py)
        return torch.ops.loradock.attention(query, key, value, module.layer_idx, scaling,
                                            *served_options(kwargs)), None
    ctx = current_context()
    if ctx is None or ctx.attention is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      scaling=scaling, dropout=dropout, **kwargs)
    return step_attention(query, key, value, module.layer_idx, scaling, *served_options(kwargs)), None


def served_options(kwargs: dict) -> tuple[int | None, float | None]:
    """(sliding_window, softcap) of what transformers hands the attention function; what the
    step cannot honour is refused, never silently dropped."""
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("attention sinks (s_aux) are not served")
    return kwargs.get("sliding_window"), kwargs.get("softcap")


def step_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer_idx: int,
                   scaling: float | None, window: int | None, softcap: float | None) -> torch.Tensor:
    """One layer's attention in a loradock step, from its batch context: the new K/V written
    into the pool's layer `layer_idx`, each query attending to its own sequence's cache."""
    batch = current_context().attention
    k_pool, v_pool = batch.k_pool[layer_idx], batch.v_pool[layer_idx]  # [slots, kv, d]
    k_pool.index_copy_(0, batch.write_index, key[0].transpose(0, 1))
    v_pool.index_copy_(0, batch.write_index, value[0].transpose(0, 1))
    q_all = query[0].transpose(0, 1)  # [T, heads, d]
    if batch.paged is not None:
        return triton_attention.paged_attention(q_all, k_pool, v_pool, batch.paged, scaling, window, softcap)[None]
    out = q_all.new_empty(q_all.shape)  # contiguous, whatever the layout of the query
    gqa = query.shape[1] != key.shape[1]
    attend = F.scaled_dot_product_attention if softcap is None else partial(softcapped_attention, softcap=softcap)
    for g in batch.groups:
        mask = g.masks.get(window)
        if mask is None:  # never silently attend past a window the model asks for
            raise ValueError(f"layer {layer_idx} asks for a sliding window of {window}, "
                             f"which this step built no mask for (windows: {sorted(w for w in g.masks if w)})")
        out_g = attend(
            rows(q_all, g.q_index).transpose(1, 2),  # [N, heads, Q, d]
            rows(k_pool, g.kv_index).transpose(1, 2),  # [N, kv_heads, L, d]
            rows(v_pool, g.kv_index).transpose(1, 2),
            attn_mask=mask, scale=scaling, enable_gqa=gqa,
        ).transpose(1, 2).reshape(-1, *q_all.shape[1:])  # [N * Q, heads, d]
        if g.select is not None:
            out_g = out_g.index_select(0, g.select)
        out.index_copy_(0, g.out_rows, out_g)
    return out[None]


@torch.library.custom_op("loradock::attention", mutates_args=())
def attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer_idx: int,
                 scaling: float | None, window: int | None, softcap: float | None) -> torch.Tensor:
    """`step_attention` as one op the compiler does not look into (the compile boundary,
    `compiled.py`): the pool and the step's groups or block tables live outside the graph."""
    return step_attention(query, key, value, layer_idx, scaling, window, softcap)


@attention_op.register_fake
def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer_idx: int,
      scaling: float | None, window: int | None, softcap: float | None) -> torch.Tensor:
    return query.new_empty(1, query.shape[2], query.shape[1], value.shape[3])


def softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor,
                         scale: float | None, enable_gqa: bool, softcap: float) -> torch.Tensor:
    """SDPA with Gemma 2's logit soft-capping (scores -> softcap * tanh(scores / softcap) before
    the mask and softmax, as transformers' eager attention does), which SDPA has no argument for."""
    if enable_gqa:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~attn_mask, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def rows(source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """source[index] for an index of any shape, as one index_select (on CPU 5x faster than
    advanced indexing for a decode step's key gather: 0.21 against 1.05 ms for 32 x 192 rows)."""
    return source.index_select(0, index.reshape(-1)).view(*index.shape, *source.shape[1:])


def pick_attention(requested: str, device: torch.device) -> str:
    """The attention backend to build steps for: "auto" is triton on CUDA where Triton is
    installed, sdpa elsewhere; "triton" on CPU only under Triton's interpreter (the tests)."""
    if requested == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "sdpa"
    if requested == "triton":
        if not triton_available():
            raise ValueError("attention='triton' needs Triton installed (it ships with CUDA builds of torch)")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("attention='triton' runs on CUDA devices (on CPU only under TRITON_INTERPRET=1, "
                             "which is for tests); use attention='sdpa' or 'auto'")
    return requested


def check_paged_kernel(device: torch.device, dtype: torch.dtype) -> str | None:
    """Run the paged kernel once on a small random step (decode tokens, a prompt chunk after a
    cached prefix, grouped heads, a window, soft-capping) against its reference on `device`:
    None when it matches, else why not (so a broken kernel is never trusted with requests)."""
    g = torch.Generator().manual_seed(0)
    k_pool, v_pool = (torch.randn(12 * 4, 2, 64, generator=g).to(device, dtype) for _ in range(2))
    q = torch.randn(1 + 1 + 9, 8, 64, generator=g).to(device, dtype)
    tables = torch.tensor([[3, 0, 0], [5, 7, 0], [11, 9, 2]], device=device)
    batch = triton_attention.paged_seqs([0, 1, 2], [2, 6, 2], [1, 1, 9], tables, 4)
    tolerance = 1e-3 if dtype == torch.float32 else 3e-2
    try:
        for window, softcap in ((None, None), (3, 5.0)):
            got = triton_attention.paged_attention(q, k_pool, v_pool, batch, None, window, softcap).float()
            want = triton_attention.reference_paged_attention(q.float(), k_pool.float(), v_pool.float(), batch,
                                                              None, window, softcap)
            error = (got - want).abs().max().item()
            if not error <= tolerance:
                return f"the kernel differs from its reference by {error:.3g} (window {window}, softcap {softcap})"
    except Exception as e:  # a kernel that fails to compile or run: serve with SDPA
        return f"{type(e).__name__}: {e}"
    return None


_registered = False


def register_attention() -> None:
    """Make `attn_implementation="loradock"` available to transformers (idempotent)."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTENTION_NAME, paged_attention)
        _registered = True
