"""Triton kernels over logits that are already in memory, and the row-statistics
helpers shared with the fused linear kernels (:mod:`.triton_linear`).

Kernels (feature flags are constexprs, so each combination is one compiled
variant, never a copy of the source):

* ``logits_stats_kernel``: streaming statistics of an (n, V) logits block in
  any float dtype, per (row block, vocabulary split) -> partial buffers.
* ``merge_kernel``: merges the per-split partials into RowStats (also used
  by the fused linear forward).
* ``logits_grad_kernel``: dL/dz = A*p + B*onehot (+ C) (x soft-cap
  derivative), written into ``out`` (which may alias the logits).

Optional row terms (constexpr flags: a launch without them compiles none of
their code): ``LOGIT_SUM``, the row sum Z of the capped logits (one more
reduction of the tile already in registers, merged by addition); ``GRAD_SUM``,
a per-row coefficient C of dL/dZ added to every column.

All arithmetic is float32 whatever the storage dtype; offsets are int64.
Exponentials are base 2 on pre-scaled arguments (``exp2(u * log2(e) / tau)``:
one ``ex2.approx`` instruction on the GPU, no range reduction); only
tl.math.exp2 / tl.log / tl.sigmoid are used (no libdevice), so the kernels also
run under TRITON_INTERPRET=1.  NaN policy (every backend): a NaN logit makes
the row's value NaN, its max logit NaN and its argmax the first NaN column
(as ``torch.max``).
"""

from __future__ import annotations

import triton
import triton.language as tl

NEG_INF = tl.constexpr(float("-inf"))
FLT_MAX = tl.constexpr(3.4028234663852886e38)
INT_MAX = tl.constexpr(2**31 - 1)
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def softcap_fn(z, cap):
    # c * tanh(z / c), with tanh(u) = 2 * sigmoid(2u) - 1 (no libdevice tanh;
    # absolute error ~ c * 2^-24, saturates correctly at +-inf).
    return cap * (2.0 * tl.sigmoid(z * (2.0 / cap)) - 1.0)


@triton.jit
def round_to(x, dtype: tl.constexpr, EMULATE: tl.constexpr):
    # float32 -> dtype, round to nearest even (what the GPU does).  The
    # interpreter truncates float32 -> bfloat16 instead, so under it
    # (EMULATE) the rounding is done on the bits: add 0x7FFF plus the lowest
    # kept bit, then drop the low 16 bits.
    if EMULATE and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def swizzle(pid, num_m, num_n, group_m):
    # Grouped ordering: group_m consecutive row blocks share each column
    # (vocabulary split) block while it is hot in L2 (group_m is planned from
    # the L2 size, see triton_kernels.plan_grid).
    width = group_m * num_n
    group = pid // width
    first_m = group * group_m
    size_m = tl.minimum(num_m - first_m, group_m)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


# Online (streaming) statistics of one tile z (R, C) of capped logits with
# columns `cols` (only the columns where `cmask` holds count):
#   m  = running max_v z                       (also the max logit)
#   s  = sum_v e_v,           e_v = exp((z_v - m) / tau)
#   w  = sum_v e_v * t_v,     t_v = (z_v - m) / tau         (entropy only)
# When the max moves m -> m' (delta = (m - m') / tau <= 0, alpha = exp(delta)):
#   s' = alpha * s,   w' = alpha * (w + s * delta)
# since every old t_v becomes t_v + delta.  At the end
#   V = m + tau * log s,   H = -sum p log p = log s - w / s.
# Shifting by the max keeps w free of the cancellation that sum_v e_v z_v has.
# Masked columns are set to -inf once; e is then 0 there, and t is clamped to
# -FLT_MAX so that e * t is 0 rather than NaN.  Only the one (R, C) tile is
# live; every other quantity is a fused row reduction of it.
# tl.max skips NaN (max.f32 returns the other operand; so does the
# interpreter), so the max needs no NaN-free copy of the tile.
# argmax: the smallest column holding the tile max, kept only where the tile
# max is strictly larger than the running max (first occurrence wins, like
# torch.max); a NaN logit is recorded in the same int32 as -1 - (its column),
# sticky once set, so that the first NaN of the split wins (NaN policy) without
# a second loop-carried index.  It is computed before the exponentials (fewer
# tiles live at once).  q: z at the target column (0 where none matches, e.g. -1).
# zs (LOGIT_SUM): Z = sum_v z_v, the plain sum of the capped logits; it has no
# shift, so it needs no rescaling when m moves: zs' = zs + sum_{tile} z_v,
# masked columns counting 0 (not the -inf of the max), NaN propagating (the
# NaN policy).  It is the last reduction of the tile: placed there, the
# all-features variants compile without spills (see triton_aot).
@triton.jit
def online_update(z, cmask, cols, tgt, m, s, w, q, idx, zs, inv_tau,
                  TARGET: tl.constexpr, ENTROPY: tl.constexpr, ARGMAX: tl.constexpr,
                  LOGIT_SUM: tl.constexpr):
    zm = tl.where(cmask[None, :], z, NEG_INF)
    tile_max = tl.max(zm, 1)                # max, shift and argmax skip NaN ...
    if ARGMAX:
        tile_idx = tl.min(tl.where(zm == tile_max[:, None], cols[None, :], INT_MAX), 1)
        tile_nan = tl.min(tl.where(zm != zm, cols[None, :], INT_MAX), 1)
        idx = tl.where(idx < 0, idx, tl.where(tile_nan < INT_MAX, -1 - tile_nan,
                                              tl.where(tile_max > m, tile_idx, idx)))
    m_new = tl.maximum(m, tile_max)
    m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
    k = inv_tau * LOG2E                     # base-2 exponents: one ex2 per logit
    delta2 = tl.where(m == NEG_INF, 0.0, (m - m_safe) * k)
    alpha = tl.math.exp2(delta2)
    t2 = (zm - m_safe[:, None]) * k         # ... the sums do not: V is NaN then
    e = tl.math.exp2(t2)
    if ENTROPY:   # w in natural units: t = t2 * ln 2
        w = alpha * (w + s * (delta2 * LN2)) + tl.sum(e * tl.maximum(t2, -FLT_MAX), 1) * LN2
    s = alpha * s + tl.sum(e, 1)
    if TARGET:
        q += tl.sum(tl.where(cols[None, :] == tgt[:, None], zm, 0.0), 1)
    if LOGIT_SUM:
        zs += tl.sum(tl.where(cmask[None, :], zm, 0.0), 1)
    return m_new, s, w, q, idx, zs


# The running statistics of BLOCK rows before their first tile: max m = -inf,
# s = w = zs = 0, argmax idx = 0 (q starts as the caller's).
@triton.jit
def row_state(BLOCK: tl.constexpr):
    zero = tl.zeros((BLOCK,), tl.float32)
    return tl.full((BLOCK,), NEG_INF, tl.float32), zero, zero, tl.zeros((BLOCK,), tl.int32), zero


# The per-row inputs of the gradient: target, soft value V and the coefficients
# A (gv), B (gt), C (gs; B's slot when there is no GRAD_SUM) of dlogits.
@triton.jit
def row_coefficients(tgt_ptr, value_ptr, gv_ptr, gt_ptr, gs_ptr, rows64, rmask,
                     GRAD_SUM: tl.constexpr):
    tgt = tl.load(tgt_ptr + rows64, mask=rmask, other=-1).to(tl.int32)
    value = tl.load(value_ptr + rows64, mask=rmask, other=0.0)
    gv = tl.load(gv_ptr + rows64, mask=rmask, other=0.0)
    gt = tl.load(gt_ptr + rows64, mask=rmask, other=0.0)
    gs = gt
    if GRAD_SUM:
        gs = tl.load(gs_ptr + rows64, mask=rmask, other=0.0)
    return tgt, value, gv, gt, gs


# dL/dz = A * p + B * [v == target] (+ C),  p = exp((z - V) / tau)   (z capped)
# times d(c tanh(u/c))/du = 1 - tanh^2 = 1 - (z / c)^2 with soft-capping.
# C (GRAD_SUM) is the coefficient of dL/dZ, Z = sum_v z_v: dZ/dz_v = 1 for every
# column, so it is one more add per element, before the soft-cap derivative
# (the chain rule through the cap applies to it as to the other terms).
@triton.jit
def dlogits(z, cols, tgt, value, gv, gt, gs, inv_tau, cap, SOFTCAP: tl.constexpr,
            GRAD_SUM: tl.constexpr):
    p = tl.math.exp2((z - value[:, None]) * (inv_tau * LOG2E))
    dz = gv[:, None] * p + tl.where(cols[None, :] == tgt[:, None], gt[:, None], 0.0)
    if GRAD_SUM:
        dz += gs[:, None]
    if SOFTCAP:
        r = z / cap
        dz = dz * (1.0 - r * r)
    return dz


@triton.jit
def store_partials(pm_ptr, ps_ptr, pw_ptr, pq_ptr, pi_ptr, pz_ptr, off, mask, m, s, w, q, idx,
                   zs, ENTROPY: tl.constexpr, ARGMAX: tl.constexpr, LOGIT_SUM: tl.constexpr):
    # with ARGMAX, a NaN seen in the split (idx = -1 - its column, see
    # online_update) is stored as max NaN, index the first NaN
    if ARGMAX:
        m = tl.where(idx < 0, float("nan"), m)
        idx = tl.where(idx < 0, -1 - idx, idx)
    tl.store(pm_ptr + off, m, mask=mask)
    tl.store(ps_ptr + off, s, mask=mask)
    tl.store(pq_ptr + off, q, mask=mask)
    if ENTROPY:
        tl.store(pw_ptr + off, w, mask=mask)
    if ARGMAX:
        tl.store(pi_ptr + off, idx, mask=mask)
    if LOGIT_SUM:
        tl.store(pz_ptr + off, zs, mask=mask)


# Streaming statistics of stored logits: program (row block, vocabulary split)
# walks its split in BLOCK_V columns with online_update and writes one partial
# per row; merge_kernel combines the splits.
@triton.jit(do_not_specialize=["n", "vb_per_split"])
def logits_stats_kernel(z_ptr, tgt_ptr, pm_ptr, ps_ptr, pw_ptr, pq_ptr, pi_ptr, pz_ptr,
                        n, V, stride_z, vb_per_split, inv_tau, cap,
                        SOFTCAP: tl.constexpr, ENTROPY: tl.constexpr, ARGMAX: tl.constexpr,
                        LOGIT_SUM: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n
    rows64 = rows.to(tl.int64)
    tgt = tl.load(tgt_ptr + rows64, mask=rmask, other=-1).to(tl.int32)
    m, s, w, idx, zs = row_state(BLOCK_R)
    q = tl.zeros((BLOCK_R,), tl.float32)
    v_begin = pid_s * vb_per_split * BLOCK_V
    v_end = tl.minimum(V, v_begin + vb_per_split * BLOCK_V)
    row_ptr = z_ptr + rows64[:, None] * stride_z
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < V
        z = tl.load(row_ptr + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                    other=0.0).to(tl.float32)
        if SOFTCAP:
            z = softcap_fn(z, cap)
        m, s, w, q, idx, zs = online_update(z, cmask, cols, tgt, m, s, w, q, idx, zs, inv_tau,
                                            True, ENTROPY, ARGMAX, LOGIT_SUM)
    off = pid_s.to(tl.int64) * n + rows64
    store_partials(pm_ptr, ps_ptr, pw_ptr, pq_ptr, pi_ptr, pz_ptr, off, rmask, m, s, w, q, idx,
                   zs, ENTROPY, ARGMAX, LOGIT_SUM)


# Merge of per-split partials (m_i, s_i, w_i, q_i, idx_i), in split order:
#   M = max_i m_i,  a_i = exp((m_i - M) / tau),  d_i = (m_i - M) / tau
#   s = sum_i a_i s_i,   w = sum_i a_i (w_i + s_i d_i),   q = sum_i q_i
#   V = M + tau log s,   H = log s - w / s,   argmax from the first split
#   holding M.  Rows whose logits are all -inf keep M = -inf (V = -inf).
#   A split whose m_i is NaN saw a NaN logit (argmax mode): the first such
#   split gives the argmax (its first NaN column) and the max logit is NaN.
#   LOGIT_SUM: Z = sum_i zs_i (plain sums of disjoint columns: no rescaling).
@triton.jit(do_not_specialize=["n", "nsplit"])
def merge_kernel(pm_ptr, ps_ptr, pw_ptr, pq_ptr, pi_ptr, pz_ptr,
                 value_ptr, q_ptr, ent_ptr, amax_ptr, maxl_ptr, sum_ptr,
                 n, nsplit, tau, inv_tau,
                 ENTROPY: tl.constexpr, ARGMAX: tl.constexpr, LOGIT_SUM: tl.constexpr,
                 BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < n
    rows64 = rows.to(tl.int64)
    M = tl.full((BLOCK,), NEG_INF, tl.float32)
    S = tl.zeros((BLOCK,), tl.float32)
    W = tl.zeros((BLOCK,), tl.float32)
    Q = tl.zeros((BLOCK,), tl.float32)
    idx = tl.zeros((BLOCK,), tl.int32)
    nan_seen = tl.zeros((BLOCK,), tl.int1)
    Z = tl.zeros((BLOCK,), tl.float32)
    k = inv_tau * LOG2E
    for _ in range(0, nsplit):          # split i's partials start at i * n
        mi = tl.load(pm_ptr + rows64, mask=rmask, other=NEG_INF)
        si = tl.load(ps_ptr + rows64, mask=rmask, other=1.0)   # 1: no log(0) on padding
        Q += tl.load(pq_ptr + rows64, mask=rmask, other=0.0)
        nan_i = mi != mi
        mi = tl.where(nan_i, NEG_INF, mi)   # (its s_i is NaN: V stays NaN)
        m_new = tl.maximum(M, mi)
        m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
        d_old = tl.where(M == NEG_INF, 0.0, (M - m_safe) * k)
        d_i = tl.where(mi == NEG_INF, 0.0, (mi - m_safe) * k)
        a_old = tl.math.exp2(d_old)
        a_i = tl.math.exp2(d_i)
        if ENTROPY:
            wi = tl.load(pw_ptr + rows64, mask=rmask, other=0.0)
            W = a_old * (W + S * (d_old * LN2)) + a_i * (wi + si * (d_i * LN2))
        if ARGMAX:
            ii = tl.load(pi_ptr + rows64, mask=rmask, other=0)
            idx = tl.where(nan_seen, idx, tl.where(nan_i | (mi > M), ii, idx))
            nan_seen = nan_seen | nan_i
        if LOGIT_SUM:
            Z += tl.load(pz_ptr + rows64, mask=rmask, other=0.0)
        S = a_old * S + a_i * si
        M = m_new
        pm_ptr += n
        ps_ptr += n
        pw_ptr += n
        pq_ptr += n
        pi_ptr += n
        pz_ptr += n
    m_safe = tl.where(M == NEG_INF, 0.0, M)
    log_s = tl.log(S)
    tl.store(value_ptr + rows64, m_safe + tau * log_s, mask=rmask)
    tl.store(q_ptr + rows64, Q, mask=rmask)
    if ENTROPY:
        tl.store(ent_ptr + rows64, log_s - W / S, mask=rmask)
    if ARGMAX:
        tl.store(amax_ptr + rows64, idx.to(tl.int64), mask=rmask)
        tl.store(maxl_ptr + rows64, tl.where(nan_seen, float("nan"), M), mask=rmask)
    if LOGIT_SUM:
        tl.store(sum_ptr + rows64, Z, mask=rmask)


# Gradient of stored logits, tile by tile; every element is read before the
# same program writes it, so `out` may alias the logits.
# GRAD_SUM: gs_ptr holds C (see dlogits), else it is never read.
@triton.jit(do_not_specialize=["n"])
def logits_grad_kernel(z_ptr, tgt_ptr, value_ptr, gv_ptr, gt_ptr, gs_ptr, out_ptr,
                       n, V, stride_z, stride_o, inv_tau, cap,
                       SOFTCAP: tl.constexpr, GRAD_SUM: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, INTERP: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    rmask = rows < n
    rows64 = rows.to(tl.int64)
    mask = rmask[:, None] & (cols < V)[None, :]
    tgt, value, gv, gt, gs = row_coefficients(tgt_ptr, value_ptr, gv_ptr, gt_ptr, gs_ptr,
                                              rows64, rmask, GRAD_SUM)
    z = tl.load(z_ptr + rows64[:, None] * stride_z + cols[None, :], mask=mask,
                other=0.0).to(tl.float32)
    if SOFTCAP:
        z = softcap_fn(z, cap)
    dz = dlogits(z, cols, tgt, value, gv, gt, gs, inv_tau, cap, SOFTCAP, GRAD_SUM)
    tl.store(out_ptr + rows64[:, None] * stride_o + cols[None, :],
             round_to(dz, out_ptr.dtype.element_ty, INTERP), mask=mask)
