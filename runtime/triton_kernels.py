"""Triton kernels (imported only where Triton is installed; see triton_lora.py)."""

import triton
import triton.language as tl


@triton.jit
def _k_range(split, k_end, k_chunk, SPLIT_K: tl.constexpr):
    """The slice [k_lo, k_hi) of K this program sums: all of it, or the `split`th `k_chunk`."""
    k_lo = 0
    k_hi = k_end
    if SPLIT_K > 1:
        k_lo = split * k_chunk
        k_hi = tl.minimum(k_end, k_lo + k_chunk)
    return k_lo, k_hi


@triton.jit
def _run_block(runs_ptr, run, block_m, block_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Run `run` of the table (start, length, slot): its start and slot, this program's rows of
    it (and which of them exist) and its columns."""
    start = tl.load(runs_ptr + run * 3)
    length = tl.load(runs_ptr + run * 3 + 1)
    slot = tl.load(runs_ptr + run * 3 + 2)
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    return start, slot, rows, rows < length, block_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def _tile(x_ptr, w_ptr, start, rows, row_ok, cols, slot, k_lo, k_end, n_end, stride_xt, stride_xs, stride_ws,
          stride_wk, stride_wn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
          EXACT_FP32: tl.constexpr, X_SPLITS: tl.constexpr):
    """x[start + rows, k_lo:k_end] @ W[slot][k_lo:k_end, cols] in fp32 ([BLOCK_M, BLOCK_N];
    columns from n_end on read as zero). X_SPLITS > 1: x is that many partial sums (a split
    shrink's, `stride_xs` apart), added up as they are read."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + (start + rows)[:, None] * stride_xt + ks[None, :]
        x_ok = row_ok[:, None] & (ks[None, :] < k_end)
        x = tl.load(x_ptrs, mask=x_ok, other=0.0)
        if X_SPLITS > 1:
            x = x.to(tl.float32)
            for s in tl.static_range(1, X_SPLITS):
                x += tl.load(x_ptrs + s * stride_xs, mask=x_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + slot * stride_ws + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                    mask=(ks[:, None] < k_end) & (cols[None, :] < n_end), other=0.0)
        x = x.to(w.dtype)
        if EXACT_FP32:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    return acc


@triton.jit
def segmented_matmul_kernel(x_ptr, w_ptr, out_ptr, runs_ptr, bias_ptr, dora_ptr, base_bias_ptr, ranks_ptr, K, N,
                            k_chunk, stride_xt, stride_xs, stride_ws, stride_wk, stride_wn, stride_ot, stride_os,
                            stride_rs, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            EXACT_FP32: tl.constexpr, ADD_TO_OUT: tl.constexpr, SLOT_ROWS: tl.constexpr,
                            BASE_BIAS: tl.constexpr, RANK_DIM: tl.constexpr, SPLIT_K: tl.constexpr,
                            X_SPLITS: tl.constexpr):
    """out[start:start + length] = x[start:start + length] @ W[slot] for run `program_id(0)` of
    `runs` [G, 3] (start, length, slot); zeros where slot is 0. This program: BLOCK_M tokens of
    the run (`program_id(1)`), BLOCK_N output columns (`program_id(2)`). Operands go to the
    tensor cores in their own dtype (bf16/fp16), accumulating in fp32; fp32 operands are
    multiplied exactly (EXACT_FP32: "ieee", not TF32), as torch's matmuls are by default.

    ADD_TO_OUT: add to out (the base output) instead, and with SLOT_ROWS apply the slot's LoRA
    bias and DoRA rows (bias_ptr, dora_ptr [S, N], row stride stride_rs) in the same pass,
    `lora_ops.apply_bias_and_dora`'s formula (BASE_BIAS: the base layer's bias [N], which DoRA
    does not scale); slot 0 rows are left as they are (its rows are zero).

    RANK_DIM: which side is the LoRA rank, padded to the buffers' max rank: 1, N (shrink), or 2, K
    (expand); the slot's rank (`ranks_ptr` [S]) then bounds what is read, so a rank-8 adapter
    in rank-64 buffers reads an eighth of them (rows past its rank are zero, so the result is
    the same). 0: read everything.

    SPLIT_K > 1 (a shrink of few tokens, whose programs would each loop over all of K): program
    `program_id(1) % SPLIT_K` sums only its `k_chunk` of K and stores that partial sum in slice
    `split` of out [SPLIT_K, T, N] (`stride_os` apart), zeros where it has none; the expand reads
    x as X_SPLITS such partials and adds them up. One order of addition: deterministic."""
    split = tl.program_id(1) % SPLIT_K
    start, slot, rows, row_ok, cols = _run_block(runs_ptr, tl.program_id(0), tl.program_id(1) // SPLIT_K,
                                                 tl.program_id(2), BLOCK_M, BLOCK_N)
    col_ok = cols < N
    k_end, n_end = K, N  # what is read of W[slot]
    if RANK_DIM == 1:
        n_end = tl.minimum(N, tl.load(ranks_ptr + slot))
    if RANK_DIM == 2:
        k_end = tl.minimum(K, tl.load(ranks_ptr + slot))
    k_lo, k_end = _k_range(split, k_end, k_chunk, SPLIT_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if slot != 0:
        acc = _tile(x_ptr, w_ptr, start, rows, row_ok, cols, slot, k_lo, k_end, n_end, stride_xt, stride_xs,
                    stride_ws, stride_wk, stride_wn, BLOCK_M, BLOCK_N, BLOCK_K, EXACT_FP32, X_SPLITS)
    out_ptrs = out_ptr + split * stride_os + (start + rows)[:, None] * stride_ot + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    if ADD_TO_OUT:
        if slot != 0:
            z = tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32) + acc
            if SLOT_ROWS:
                z += tl.load(bias_ptr + slot * stride_rs + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
                scale = tl.load(dora_ptr + slot * stride_rs + cols, mask=col_ok, other=0.0).to(tl.float32)
                z_base = z
                if BASE_BIAS:
                    z_base = z - tl.load(base_bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
                z += scale[None, :] * z_base
            tl.store(out_ptrs, z.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def grouped_shrink_kernel(x_ptr, w0_ptr, w1_ptr, w2_ptr, out0_ptr, out1_ptr, out2_ptr, runs_ptr,
                          ranks0_ptr, ranks1_ptr, ranks2_ptr, K, N, k_chunk, stride_xt, stride_ws, stride_wk,
                          stride_wn, stride_ot, stride_os, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, EXACT_FP32: tl.constexpr, COL_BLOCKS: tl.constexpr,
                          SPLIT_K: tl.constexpr):
    """The shrinks of up to three layers that read one input (an attention's q/k/v, an MLP's
    gate/up) in one launch: out_j[run] = x[run] @ W_j[slot] (each W_j [S, N, K] read as its
    transpose, to the slot's rank in that layer, ranks_j), member j = program_id(2) // COL_BLOCKS.
    The members' weights and outputs share shapes and strides. SPLIT_K: as in
    `segmented_matmul_kernel`, each output then [SPLIT_K, T, N] partial sums."""
    member = tl.program_id(2) // COL_BLOCKS
    w_ptr, out_ptr, ranks_ptr = w0_ptr, out0_ptr, ranks0_ptr
    if member == 1:
        w_ptr, out_ptr, ranks_ptr = w1_ptr, out1_ptr, ranks1_ptr
    if member == 2:
        w_ptr, out_ptr, ranks_ptr = w2_ptr, out2_ptr, ranks2_ptr
    split = tl.program_id(1) % SPLIT_K
    start, slot, rows, row_ok, cols = _run_block(runs_ptr, tl.program_id(0), tl.program_id(1) // SPLIT_K,
                                                 tl.program_id(2) % COL_BLOCKS, BLOCK_M, BLOCK_N)
    k_lo, k_end = _k_range(split, K, k_chunk, SPLIT_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if slot != 0:
        acc = _tile(x_ptr, w_ptr, start, rows, row_ok, cols, slot, k_lo, k_end,
                    tl.minimum(N, tl.load(ranks_ptr + slot)), stride_xt, 0, stride_ws, stride_wk, stride_wn,
                    BLOCK_M, BLOCK_N, BLOCK_K, EXACT_FP32, 1)
    tl.store(out_ptr + split * stride_os + (start + rows)[:, None] * stride_ot + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols[None, :] < N))
