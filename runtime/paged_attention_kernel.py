"""The paged attention Triton kernel (imported only where Triton is installed; see
triton_attention.py, which launches it and holds its reference)."""

import triton
import triton.language as tl


@triton.jit
def paged_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, tables_ptr, seqs_ptr, scale, softcap, window,
                           head_dim, block_size, stride_qt, stride_qh, stride_kt, stride_kh,
                           stride_ot, stride_oh, stride_tab,
                           GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SOFTCAP: tl.constexpr,
                           WINDOW: tl.constexpr, EXACT_FP32: tl.constexpr):
    """Attention of BLOCK_Q query tokens of sequence `program_id(0)` (rows `program_id(2)`), for
    the GROUP query heads that share key/value head `program_id(1)`, over the sequence's keys read
    straight from the paged pool through its block table: no gathered copy, no mask tensor.

    seqs [N, 3] int32 is (first packed row, new tokens, cached tokens) per sequence; query t of a
    sequence sits at position cached + t and sees keys 0..cached + t, or under a sliding window the
    last `window` of them (key position > query position - window, transformers' rule); keys
    outside the window are never read. The program's rows are (token, head) pairs, so a decode
    token's GROUP heads share one pass over the keys (GQA). Scores are optionally soft-capped
    (softcap * tanh(s / softcap), Gemma 2) before an online softmax in fp32 (FlashAttention's)."""
    seq, kv_head, q_block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(seqs_ptr + seq * 3)
    q_len = tl.load(seqs_ptr + seq * 3 + 1)
    cached = tl.load(seqs_ptr + seq * 3 + 2)
    if q_block * BLOCK_Q < q_len:
        r = tl.arange(0, BLOCK_Q * GROUP_PAD)
        t = q_block * BLOCK_Q + r // GROUP_PAD  # token of the chunk
        g = r % GROUP_PAD  # query head within the group
        row_ok = (t < q_len) & (g < GROUP)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < head_dim
        q = tl.load(q_ptr + (q_start + t).to(tl.int64)[:, None] * stride_qt
                    + (kv_head * GROUP + g)[:, None] * stride_qh + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        q_pos = cached + t
        hi = cached + tl.minimum(q_len, (q_block + 1) * BLOCK_Q)  # past the block's last query
        lo = 0
        if WINDOW:  # the first key any of the block's queries sees, down to a tile boundary
            lo = tl.maximum(cached + q_block * BLOCK_Q - window + 1, 0) // BLOCK_N * BLOCK_N
        m = tl.full((BLOCK_Q * GROUP_PAD,), float("-inf"), dtype=tl.float32)
        total = tl.zeros((BLOCK_Q * GROUP_PAD,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_Q * GROUP_PAD, BLOCK_D), dtype=tl.float32)
        for start in range(lo, hi, BLOCK_N):
            kp = start + tl.arange(0, BLOCK_N)
            k_ok = kp < hi
            block = tl.load(tables_ptr + seq * stride_tab + kp // block_size, mask=k_ok, other=0)
            slot = (block.to(tl.int64) * block_size + kp % block_size)
            kv_mask = k_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + slot[:, None] * stride_kt + kv_head * stride_kh + d[None, :], mask=kv_mask,
                        other=0.0)
            v = tl.load(v_ptr + slot[:, None] * stride_kt + kv_head * stride_kh + d[None, :], mask=kv_mask,
                        other=0.0)
            if EXACT_FP32:
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            else:
                s = tl.dot(q, tl.trans(k)) * scale
            if SOFTCAP:
                s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)  # softcap * tanh(s / softcap)
            seen = (kp[None, :] <= q_pos[:, None]) & k_ok[None, :]
            if WINDOW:
                seen = seen & (kp[None, :] > q_pos[:, None] - window)
            s = tl.where(seen, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m - m_safe)
            total = total * alpha + tl.sum(p, 1)
            if EXACT_FP32:
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        out = acc / tl.where(total > 0, total, 1.0)[:, None]
        tl.store(o_ptr + (q_start + t).to(tl.int64)[:, None] * stride_ot
                 + (kv_head * GROUP + g)[:, None] * stride_oh + d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
