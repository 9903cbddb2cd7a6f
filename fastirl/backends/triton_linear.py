"""Triton kernels of the fused linear head: z = x @ W.T (+ b), soft-capped,
never stored.  One kernel family per pass, features as constexprs:

* ``linear_fwd_kernel``   statistics, program = (row block, vocabulary split),
                          partials merged by :func:`.triton_logits.merge_kernel`
                          (``LOGIT_SUM``: also the row sum of the capped logits).
* ``linear_bwd_rows_kernel``  fast-mode backward: dx, dW, db added with
                          float32 atomics, program = (row block, vocabulary
                          split); ``GRAD_SUM``: a per-row coefficient added to
                          every column of dz.  (The deterministic backward is not a kernel
                          of its own: vocabulary slabs of GEMMs around
                          :func:`.triton_logits.logits_grad_kernel`.)

Shared conventions: x (n, H) and W (V, H) row-major with unit column stride,
row offsets in int64 (row * H and row * V exceed 2^31 at real sizes), GEMM
tiles in the input dtype with float32 accumulation (``DOT_F32`` casts them to
float32 first: used under the interpreter, where 16-bit ``tl.dot`` is wrong),
``DOT_PREC`` the float32 dot precision (see triton_kernels.dot_precision).
``DOT_F32`` also makes the rounding of dz to bfloat16 exact under the
interpreter (see round_to).  Sizes that change between calls (n, splits,
group) are not specialised on (``do_not_specialize``), so chunks of different
lengths reuse one compiled kernel.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_logits import (dlogits, online_update, round_to, row_coefficients, row_state,
                            softcap_fn, store_partials, swizzle)

NEG_INF = tl.constexpr(float("-inf"))


# One (BLOCK_M, BLOCK_N) tile of capped logits: a K loop over H of
# x[rows, k] @ W[cols, k].T with float32 accumulation, + bias, then soft cap.
# Where the bias goes is a register-allocation choice (found with triton_aot,
# every flag combination): 16-bit inputs (operands from shared memory, the
# pressure is after the K loop, in the forward's statistics) start the
# accumulator with it, so that no copy of it is live after the loop; float32
# inputs (TF32 operands in registers on sm_80, the pressure is in the loop)
# add it after the loop.
# W is read as a (BLOCK_K, BLOCK_N) view of its row-major storage (a
# transposed operand), so no copy of W is ever made.
@triton.jit
def logit_tile(x_ptr, w_ptr, b_ptr, rows64, rmask, cols64, cmask, H, stride_x, stride_w, cap,
               HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr):
    ks = tl.arange(0, BLOCK_K)
    xp = x_ptr + rows64[:, None] * stride_x + ks[None, :]
    wp = w_ptr + cols64[None, :] * stride_w + ks[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    BIAS_FIRST: tl.constexpr = x_ptr.dtype.element_ty != tl.float32
    if HAS_BIAS and BIAS_FIRST:
        acc += tl.load(b_ptr + cols64, mask=cmask, other=0.0).to(tl.float32)[None, :]
    for k0 in range(0, H, BLOCK_K):
        kmask = (k0 + ks) < H
        a = tl.load(xp, mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(wp, mask=kmask[:, None] & cmask[None, :], other=0.0)
        if DOT_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
        xp += BLOCK_K
        wp += BLOCK_K
    if HAS_BIAS and not BIAS_FIRST:
        acc += tl.load(b_ptr + cols64, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if SOFTCAP:
        acc = softcap_fn(acc, cap)
    return acc


# Target logit q = x . W[target] (+ b[target], capped) as a gathered row dot
# product (exact products, float32 sum, like the GEMM), computed by the split
# whose columns hold the target (the others contribute 0 to the merge).  Kept
# out of the logits tile so that the tile feeds a single reduction chain.
@triton.jit
def target_logit(x_ptr, w_ptr, b_ptr, rows64, tgt, tin, H, stride_x, stride_w, cap,
                 HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    ks = tl.arange(0, BLOCK_K)
    t64 = tl.where(tin, tgt, 0).to(tl.int64)
    xp = x_ptr + rows64[:, None] * stride_x + ks[None, :]
    wp = w_ptr + t64[:, None] * stride_w + ks[None, :]
    acc = tl.zeros((BLOCK_M,), tl.float32)
    for k0 in range(0, H, BLOCK_K):
        mask = tin[:, None] & ((k0 + ks) < H)[None, :]
        a = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(wp, mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(a * b, 1)
        xp += BLOCK_K
        wp += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + t64, mask=tin, other=0.0).to(tl.float32)
    if SOFTCAP:
        acc = softcap_fn(acc, cap)
    return tl.where(tin, acc, 0.0)


# Forward: per (row block, split) the logits tiles of the split's vocabulary
# blocks, reduced on the fly by online_update (max, sum exp, sum e*t for the
# entropy, argmax, and with LOGIT_SUM the plain sum of the capped logits:
# zs += sum of the tile's valid columns, summed over splits by merge_kernel)
# plus the target logit; O(rows x splits) partials leave it.
@triton.jit(do_not_specialize=["n", "vb_per_split", "nsplit", "group_m"])
def linear_fwd_kernel(x_ptr, w_ptr, b_ptr, tgt_ptr, pm_ptr, ps_ptr, pw_ptr, pq_ptr, pi_ptr,
                      pz_ptr,
                      n, V, H, stride_x, stride_w, vb_per_split, nsplit, group_m, inv_tau, cap,
                      HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
                      ENTROPY: tl.constexpr, ARGMAX: tl.constexpr, LOGIT_SUM: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_m, pid_s = swizzle(tl.program_id(0), tl.cdiv(n, BLOCK_M), nsplit, group_m)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n
    rows64 = rows.to(tl.int64)
    tgt = tl.load(tgt_ptr + rows64, mask=rmask, other=-1).to(tl.int32)
    m, s, w, idx, zs = row_state(BLOCK_M)
    v_begin = pid_s * vb_per_split * BLOCK_N
    v_end = tl.minimum(V, v_begin + vb_per_split * BLOCK_N)
    q = target_logit(x_ptr, w_ptr, b_ptr, rows64, tgt, rmask & (tgt >= v_begin) & (tgt < v_end),
                     H, stride_x, stride_w, cap, HAS_BIAS, SOFTCAP, BLOCK_M, BLOCK_K)
    for v0 in range(v_begin, v_end, BLOCK_N):
        cols = v0 + tl.arange(0, BLOCK_N)
        cmask = cols < V
        z = logit_tile(x_ptr, w_ptr, b_ptr, rows64, rmask, cols.to(tl.int64), cmask, H,
                       stride_x, stride_w, cap, HAS_BIAS, SOFTCAP, BLOCK_M, BLOCK_N, BLOCK_K,
                       DOT_F32, DOT_PREC)
        m, s, w, q, idx, zs = online_update(z, cmask, cols, tgt, m, s, w, q, idx, zs, inv_tau,
                                            False, ENTROPY, ARGMAX, LOGIT_SUM)
    off = pid_s.to(tl.int64) * n + rows64
    store_partials(pm_ptr, ps_ptr, pw_ptr, pq_ptr, pi_ptr, pz_ptr, off, rmask, m, s, w, q, idx,
                   zs, ENTROPY, ARGMAX, LOGIT_SUM)


# dz tile of a recomputed logits tile (see dlogits), zero outside the valid
# rows / columns, rounded to the input dtype as the GEMM operand.
@triton.jit
def dz_tile(x_ptr, w_ptr, b_ptr, rows64, rmask, cols, cmask, tgt, value, gv, gt, gs,
            H, stride_x, stride_w, inv_tau, cap,
            HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, GRAD_SUM: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
            DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr):
    z = logit_tile(x_ptr, w_ptr, b_ptr, rows64, rmask, cols.to(tl.int64), cmask, H,
                   stride_x, stride_w, cap, HAS_BIAS, SOFTCAP, BLOCK_M, BLOCK_N, BLOCK_K,
                   DOT_F32, DOT_PREC)
    dz = dlogits(z, cols, tgt, value, gv, gt, gs, inv_tau, cap, SOFTCAP, GRAD_SUM)
    dz = tl.where(rmask[:, None] & cmask[None, :], dz, 0.0)
    dzc = round_to(dz, x_ptr.dtype.element_ty, DOT_F32)
    if DOT_F32:
        dzc = dzc.to(tl.float32)
    return dz, dzc


# Fast-mode backward: program (row block i, vocabulary split s) walks the
# split's vocabulary blocks j, starting at block (i * stagger) mod (blocks of
# the split) and wrapping around, so that the programs of one split add into
# different rows of dW at any moment (without the stagger, the ~SMs / splits
# programs of a split would all hit the same dW rows at once).  Per j it
# recomputes z_ij, forms dz_ij in registers and, over H in BLOCK_H slices,
#   dx[i, h] += dz_ij @ W[j, h],  dW[j, h] += dz_ij.T @ x[i, h],  db[j] += sum_i dz_ij
# with float32 atomics.  SCALE_DZ (float16 inputs): the row block's
# coefficients are divided by the power of two s = 2^floor(log2 max |A|, |B|)
# (and |C| with GRAD_SUM) before dz is rounded to float16 (so that it does not
# underflow), and the products are multiplied by s.  GRAD_SUM: dz_ij gains the
# row's C in every valid column (dlogits), so db[j] gains sum_i C_i and the
# GEMMs carry it like the other terms; no pass of its own.
@triton.jit(do_not_specialize=["n", "vb_per_split", "nsplit", "group_m", "stagger"])
def linear_bwd_rows_kernel(x_ptr, w_ptr, b_ptr, tgt_ptr, value_ptr, gv_ptr, gt_ptr, gs_ptr,
                           dx_ptr, dw_ptr, db_ptr,
                           n, V, H, stride_x, stride_w, stride_dw, vb_per_split, nsplit,
                           group_m, stagger, inv_tau, cap,
                           HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
                           GRAD_SUM: tl.constexpr,
                           DX: tl.constexpr, DW: tl.constexpr, DB: tl.constexpr,
                           SCALE_DZ: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           BLOCK_H: tl.constexpr,
                           DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_m, pid_s = swizzle(tl.program_id(0), tl.cdiv(n, BLOCK_M), nsplit, group_m)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n
    rows64 = rows.to(tl.int64)
    tgt, value, gv, gt, gs = row_coefficients(tgt_ptr, value_ptr, gv_ptr, gt_ptr, gs_ptr,
                                              rows64, rmask, GRAD_SUM)
    scale = 1.0
    if SCALE_DZ:
        big = tl.max(tl.maximum(tl.abs(gv), tl.abs(gt)), 0)
        if GRAD_SUM:
            big = tl.maximum(big, tl.max(tl.abs(gs), 0))
        scale = tl.where(big > 0.0, tl.math.exp2(tl.floor(tl.log2(big))), 1.0)
        gv = gv / scale
        gt = gt / scale
        if GRAD_SUM:
            gs = gs / scale
    hs0 = tl.arange(0, BLOCK_H)
    nblk = tl.minimum(vb_per_split, tl.cdiv(V, BLOCK_N) - pid_s * vb_per_split)
    first = (pid_m * stagger) % nblk
    for jj in range(0, nblk):
        j = first + jj
        j = tl.where(j >= nblk, j - nblk, j)
        cols = (pid_s * vb_per_split + j) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < V
        cols64 = cols.to(tl.int64)
        dz, dzc = dz_tile(x_ptr, w_ptr, b_ptr, rows64, rmask, cols, cmask, tgt, value, gv, gt,
                          gs, H, stride_x, stride_w, inv_tau, cap, HAS_BIAS, SOFTCAP, GRAD_SUM,
                          BLOCK_M, BLOCK_N, BLOCK_K, DOT_F32, DOT_PREC)
        if DB:          # before the H loop: only the rounded dz stays live there
            tl.atomic_add(db_ptr + cols64, tl.sum(dz, 0) * scale, mask=cmask, sem="relaxed")
        for h0 in range(0, H, BLOCK_H):
            hs = h0 + hs0
            hmask = hs < H
            if DX:
                wt = tl.load(w_ptr + cols64[:, None] * stride_w + hs[None, :],
                             mask=cmask[:, None] & hmask[None, :], other=0.0)
                if DOT_F32:
                    wt = wt.to(tl.float32)
                part = tl.dot(dzc, wt, input_precision=DOT_PREC)
                tl.atomic_add(dx_ptr + rows64[:, None] * H + hs[None, :], part * scale,
                              mask=rmask[:, None] & hmask[None, :], sem="relaxed")
            if DW:
                xt = tl.load(x_ptr + rows64[:, None] * stride_x + hs[None, :],
                             mask=rmask[:, None] & hmask[None, :], other=0.0)
                if DOT_F32:
                    xt = xt.to(tl.float32)
                dw_part = tl.dot(tl.trans(dzc), xt, input_precision=DOT_PREC)
                tl.atomic_add(dw_ptr + cols64[:, None] * stride_dw + hs[None, :],
                              dw_part * scale, mask=cmask[:, None] & hmask[None, :],
                              sem="relaxed")
