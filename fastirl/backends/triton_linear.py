"""Triton kernels of the fused linear head: z = x @ W.T (+ b), soft-capped,
never stored.  One kernel family per pass, features as constexprs:

* ``linear_fwd_kernel``   statistics, program = (row block, vocabulary split),
                          partials merged by :func:`.triton_logits.merge_kernel`.
* ``linear_bwd_rows_kernel``  dx (and, in fast mode, dW / db by atomics),
                          program = (row block, vocabulary split).
* ``linear_bwd_vocab_kernel`` deterministic dW / db, program = vocabulary
                          block, owning its rows of dW across all row blocks.

Shared conventions: x (n, H) and W (V, H) row-major with unit column stride,
row offsets in int64 (row * H and row * V exceed 2^31 at real sizes), GEMM
tiles in the input dtype with float32 accumulation (``DOT_F32`` casts them to
float32 first: used under the interpreter, where 16-bit ``tl.dot`` is wrong),
``DOT_PREC`` the float32 dot precision (see triton_kernels.dot_precision).
``DOT_F32`` also makes the rounding of dz to bfloat16 exact under the
interpreter (see round_to).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_logits import dlogits, online_update, round_to, softcap_fn, store_partials, swizzle

NEG_INF = tl.constexpr(float("-inf"))


# One (BLOCK_M, BLOCK_N) tile of capped logits: a K loop over H of
# x[rows, k] @ W[cols, k].T with float32 accumulation, + bias, then soft cap.
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
    if HAS_BIAS:
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
# entropy, argmax) plus the target logit; O(rows x splits) partials leave it.
@triton.jit
def linear_fwd_kernel(x_ptr, w_ptr, b_ptr, tgt_ptr, pm_ptr, ps_ptr, pw_ptr, pq_ptr, pi_ptr,
                      n, V, H, stride_x, stride_w, vb_per_split, nsplit, inv_tau, cap,
                      HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
                      ENTROPY: tl.constexpr, ARGMAX: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_m, pid_s = swizzle(tl.program_id(0), tl.cdiv(n, BLOCK_M), nsplit, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n
    rows64 = rows.to(tl.int64)
    tgt = tl.load(tgt_ptr + rows64, mask=rmask, other=-1).to(tl.int32)
    m = tl.full((BLOCK_M,), NEG_INF, tl.float32)
    s = tl.zeros((BLOCK_M,), tl.float32)
    w = tl.zeros((BLOCK_M,), tl.float32)
    idx = tl.zeros((BLOCK_M,), tl.int32)
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
        m, s, w, q, idx = online_update(z, cmask, cols, tgt, m, s, w, q, idx, inv_tau,
                                        False, ENTROPY, ARGMAX)
    off = pid_s.to(tl.int64) * n + rows64
    store_partials(pm_ptr, ps_ptr, pw_ptr, pq_ptr, pi_ptr, off, rmask, m, s, w, q, idx,
                   ENTROPY, ARGMAX)


# dz tile of a recomputed logits tile (see dlogits), zero outside the valid
# rows / columns, rounded to the input dtype as the GEMM operand.
@triton.jit
def dz_tile(x_ptr, w_ptr, b_ptr, rows64, rmask, cols, cmask, tgt, value, gv, gt,
            H, stride_x, stride_w, inv_tau, cap,
            HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
            DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr):
    z = logit_tile(x_ptr, w_ptr, b_ptr, rows64, rmask, cols.to(tl.int64), cmask, H,
                   stride_x, stride_w, cap, HAS_BIAS, SOFTCAP, BLOCK_M, BLOCK_N, BLOCK_K,
                   DOT_F32, DOT_PREC)
    dz = dlogits(z, cols, tgt, value, gv, gt, inv_tau, cap, SOFTCAP)
    dz = tl.where(rmask[:, None] & cmask[None, :], dz, 0.0)
    dzc = round_to(dz, x_ptr.dtype.element_ty, DOT_F32)
    if DOT_F32:
        dzc = dzc.to(tl.float32)
    return dz, dzc


# Backward over rows: program (row block i, vocabulary split s) walks the
# split's vocabulary blocks j; per j it recomputes z_ij, forms dz_ij in
# registers and, over H in BLOCK_H slices,
#   dx[i, h] += dz_ij @ W[j, h]                         (K = BLOCK_N)
#   dW[j, h] += dz_ij.T @ x[i, h],  db[j] += sum_i dz_ij (FAST_DW: atomics)
# Deterministic dx (DX_ATOMIC False): the program owns rows i of its split's
# float32 partial dx[s] and read-modify-writes it in a fixed order (the first
# block stores without reading, so the buffer needs no zeroing; a barrier
# orders each block's stores before the next block's loads); the host sums
# the splits in order.  Fast mode (DX_ATOMIC) adds into one buffer atomically.
@triton.jit
def linear_bwd_rows_kernel(x_ptr, w_ptr, b_ptr, tgt_ptr, value_ptr, gv_ptr, gt_ptr,
                           dx_ptr, dw_ptr, db_ptr,
                           n, V, H, stride_x, stride_w, stride_dw, vb_per_split, nsplit,
                           inv_tau, cap,
                           HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
                           DX: tl.constexpr, DX_ATOMIC: tl.constexpr,
                           FAST_DW: tl.constexpr, FAST_DB: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           BLOCK_H: tl.constexpr, GROUP_M: tl.constexpr,
                           DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_m, pid_s = swizzle(tl.program_id(0), tl.cdiv(n, BLOCK_M), nsplit, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n
    rows64 = rows.to(tl.int64)
    tgt = tl.load(tgt_ptr + rows64, mask=rmask, other=-1).to(tl.int32)
    value = tl.load(value_ptr + rows64, mask=rmask, other=0.0)
    gv = tl.load(gv_ptr + rows64, mask=rmask, other=0.0)
    gt = tl.load(gt_ptr + rows64, mask=rmask, other=0.0)
    if DX and not DX_ATOMIC:
        dx_ptr += pid_s.to(tl.int64) * n * H
    hs0 = tl.arange(0, BLOCK_H)
    v_begin = pid_s * vb_per_split * BLOCK_N
    v_end = tl.minimum(V, v_begin + vb_per_split * BLOCK_N)
    for v0 in range(v_begin, v_end, BLOCK_N):
        cols = v0 + tl.arange(0, BLOCK_N)
        cmask = cols < V
        cols64 = cols.to(tl.int64)
        dz, dzc = dz_tile(x_ptr, w_ptr, b_ptr, rows64, rmask, cols, cmask, tgt, value, gv, gt,
                          H, stride_x, stride_w, inv_tau, cap, HAS_BIAS, SOFTCAP,
                          BLOCK_M, BLOCK_N, BLOCK_K, DOT_F32, DOT_PREC)
        if FAST_DB:     # before the H loop: only the rounded dz stays live there
            tl.atomic_add(db_ptr + cols64, tl.sum(dz, 0), mask=cmask, sem="relaxed")
        for h0 in range(0, H, BLOCK_H):
            hs = h0 + hs0
            hmask = hs < H
            if DX:
                wt = tl.load(w_ptr + cols64[:, None] * stride_w + hs[None, :],
                             mask=cmask[:, None] & hmask[None, :], other=0.0)
                if DOT_F32:
                    wt = wt.to(tl.float32)
                part = tl.dot(dzc, wt, input_precision=DOT_PREC)
                ptrs = dx_ptr + rows64[:, None] * H + hs[None, :]
                omask = rmask[:, None] & hmask[None, :]
                if DX_ATOMIC:
                    tl.atomic_add(ptrs, part, mask=omask, sem="relaxed")
                else:
                    prev = tl.load(ptrs, mask=omask & (v0 > v_begin), other=0.0)
                    tl.store(ptrs, prev + part, mask=omask)
            if FAST_DW:
                xt = tl.load(x_ptr + rows64[:, None] * stride_x + hs[None, :],
                             mask=rmask[:, None] & hmask[None, :], other=0.0)
                if DOT_F32:
                    xt = xt.to(tl.float32)
                dw_part = tl.dot(tl.trans(dzc), xt, input_precision=DOT_PREC)
                tl.atomic_add(dw_ptr + cols64[:, None] * stride_dw + hs[None, :], dw_part,
                              mask=cmask[:, None] & hmask[None, :], sem="relaxed")
        if DX and not DX_ATOMIC:
            tl.debug_barrier()


# Deterministic dW / db: program = vocabulary block j, owning dW[j, :] and
# db[j].  It walks all row blocks i in order, recomputes z_ij, forms dz_ij and
# adds dz_ij.T @ x[i, h] into dW[j, h] (float32, read-modify-write over H in
# BLOCK_H slices; a barrier orders row block i's stores before i+1's loads),
# and sum_i dz_ij into a register accumulator for db[j].  No atomics: the
# order of every addition is fixed, so dW and db are bitwise reproducible.
@triton.jit
def linear_bwd_vocab_kernel(x_ptr, w_ptr, b_ptr, tgt_ptr, value_ptr, gv_ptr, gt_ptr,
                            dw_ptr, db_ptr,
                            n, V, H, stride_x, stride_w, stride_dw, inv_tau, cap,
                            HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
                            DW: tl.constexpr, DB: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            BLOCK_H: tl.constexpr,
                            DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < V
    cols64 = cols.to(tl.int64)
    hs0 = tl.arange(0, BLOCK_H)
    db_acc = tl.zeros((BLOCK_N,), tl.float32)
    for r0 in range(0, n, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        rmask = rows < n
        rows64 = rows.to(tl.int64)
        tgt = tl.load(tgt_ptr + rows64, mask=rmask, other=-1).to(tl.int32)
        value = tl.load(value_ptr + rows64, mask=rmask, other=0.0)
        gv = tl.load(gv_ptr + rows64, mask=rmask, other=0.0)
        gt = tl.load(gt_ptr + rows64, mask=rmask, other=0.0)
        dz, dzc = dz_tile(x_ptr, w_ptr, b_ptr, rows64, rmask, cols, cmask, tgt, value, gv, gt,
                          H, stride_x, stride_w, inv_tau, cap, HAS_BIAS, SOFTCAP,
                          BLOCK_M, BLOCK_N, BLOCK_K, DOT_F32, DOT_PREC)
        if DB:          # before the H loop: only the rounded dz stays live there
            db_acc += tl.sum(dz, 0)
        if DW:
            dzt = tl.trans(dzc)
            for h0 in range(0, H, BLOCK_H):
                hs = h0 + hs0
                hmask = hs < H
                xt = tl.load(x_ptr + rows64[:, None] * stride_x + hs[None, :],
                             mask=rmask[:, None] & hmask[None, :], other=0.0)
                if DOT_F32:
                    xt = xt.to(tl.float32)
                part = tl.dot(dzt, xt, input_precision=DOT_PREC)
                ptrs = dw_ptr + cols64[:, None] * stride_dw + hs[None, :]
                omask = cmask[:, None] & hmask[None, :]
                prev = tl.load(ptrs, mask=omask, other=0.0)
                tl.store(ptrs, prev + part, mask=omask)
            tl.debug_barrier()
    if DB:
        prev_b = tl.load(db_ptr + cols64, mask=cmask, other=0.0)
        tl.store(db_ptr + cols64, prev_b + db_acc, mask=cmask)
