// Per-element math of the fastirl epilogues, shared by the CPU (iq_cpu.cpp)
// and CUDA (iq_cuda.cu) code so that the CPU tests exercise the very functions
// the GPU kernels run.  Everything here is branch-free straight-line float
// arithmetic (selects, no calls into libm) so that a compiler vectorises the
// CPU loops that use it and the CUDA kernels keep few registers.
//
// Contract (see fastirl/backends/base.py and docs/objective.md):
//   z_c  = c * tanh(z / c)                      (soft cap, optional)
//   V    = tau * logsumexp(z_c / tau)           (soft value)
//   p    = exp((z_c - V) / tau)                 (policy)
//   H    = log S - T / S, with S = sum_v e_v, T = sum_v e_v u_v,
//          u_v = (z_c,v - M) / tau, e_v = exp(u_v), M = max_v z_c,v
//   Z    = sum_v z_c,v                          (logit sum, optional; before tau)
//   dz_v = (grad_value * p_v + grad_target * [v == target] + grad_sum)
//          * (1 - (z_c,v / c)^2)
// grad_sum is the coefficient of dL/dZ: dZ/dz_c,v = 1 for every column, so it
// is one more term added uniformly before the soft-cap derivative (which
// applies to it as to the others: dz_c,v / dz_v = 1 - (z_c,v / c)^2).
// Arithmetic is float32 throughout; a*b + c is fused where the target allows.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define IQ_HD __host__ __device__ __forceinline__
#else
#define IQ_HD inline __attribute__((always_inline))
#endif

namespace fastirl {

// Scalars of a LogitSpec as the kernels take them.
struct Spec {
  float tau;
  float inv_tau;
  float cap;      // 0 without a soft cap
  float inv_cap;  // 0 without a soft cap
};

// Element type of a logits / gradient block.
enum class Dtype { kF32, kBF16, kF16 };

namespace math {

IQ_HD float int_bits_to_float(int32_t i) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(i);
#else
  return __builtin_bit_cast(float, i);
#endif
}

IQ_HD float neg_inf() { return int_bits_to_float(static_cast<int32_t>(0xff800000u)); }
IQ_HD float pos_inf() { return int_bits_to_float(0x7f800000); }

// a*b + c.  On the GPU one fused rounding; on the CPU a plain expression that
// the compiler contracts into an FMA where the target has one (-ffp-contract=fast;
// calling fmaf would fall back to a slow software FMA on baseline x86-64).
IQ_HD float fma_(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return a * b + c;
#endif
}

IQ_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint32_t>(__float_as_int(f));
#else
  return __builtin_bit_cast(uint32_t, f);
#endif
}

// exp(x) in float32, relative error below 2 ulp on [-87.3, 88] (Cephes expf
// polynomial after a two-constant Cody-Waite reduction); x < -87.33 gives 0 (no
// denormals), x > 88 gives +inf (exp(88) = 1.65e38; the true value only
// overflows at 88.72), NaN gives NaN.  About 20 vector instructions: the
// clamps are max/min that let NaN through, round-to-nearest of x*log2(e) is
// the 1.5*2^23 trick (these files are never compiled with -ffast-math, which
// would fold it away), and 2^n is built from the bits of that same sum.
IQ_HD float exp_(float x) {
  const float lo = -87.33654475f, hi = 88.0f;
  float xc = lo > x ? lo : x;  // NaN stays NaN
  xc = hi < xc ? hi : xc;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: t holds round(x log2 e) in its low bits
  const float t = fma_(xc, 1.44269504088896341f, shifter);
  const float n = t - shifter;
  float r = fma_(n, -0.693359375f, xc);
  r = fma_(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = fma_(p, r, 1.3981999507e-3f);
  p = fma_(p, r, 8.3334519073e-3f);
  p = fma_(p, r, 4.1665795894e-2f);
  p = fma_(p, r, 1.6666665459e-1f);
  p = fma_(p, r, 5.0000001201e-1f);
  p = fma_(p, r * r, r) + 1.0f;
  // bits(t) = bits(1.5 * 2^23) + n and bits(1.5 * 2^23) << 23 == 0 (mod 2^32),
  // so this is (n + 127) << 23 = 2^n for n in [-126, 127].
  const uint32_t scale = (float_bits(t) << 23) + (127u << 23);
  float y = p * int_bits_to_float(static_cast<int32_t>(scale));
  y = x < lo ? 0.0f : y;
  y = x > hi ? pos_inf() : y;
  return y;
}

// 2^x: on the GPU one ex2.approx instruction (relative error ~2^-22, results
// below 2^-126 flushed to 0, NaN stays NaN); on the host exp_(x ln 2), so that
// host builds (the CPU tests) run the same formulas.
IQ_HD float exp2_(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return exp_(x * 0.693147180559945309f);
#endif
}

// The base of the exponentials of a kernel.  BaseE (the CPU kernels): exp_,
// arguments u = (z - m) / tau.  Base2 (the CUDA kernels): exp2_ on arguments
// pre-scaled by log2(e), u2 = (z - m) * (log2(e) / tau): one multiply-add and
// one hardware instruction per logit instead of a ~20-instruction polynomial.
// `k` below is the scale of the base: Base::scale(inv_tau).  Sums of exp are
// the same in both; e * u sums (entropy) are in base units, times kLn = ln(base).
struct BaseE {
  static IQ_HD float pow(float u) { return exp_(u); }
  static IQ_HD float scale(float inv_tau) { return inv_tau; }
  static constexpr float kLn = 1.0f;
  static constexpr float kMinU = -104.0f;  // exp underflows to 0 before this
};
struct Base2 {
  static IQ_HD float pow(float u) { return exp2_(u); }
  static IQ_HD float scale(float inv_tau) { return inv_tau * 1.44269504088896341f; }
  static constexpr float kLn = 0.693147180559945309f;
  static constexpr float kMinU = -150.0f;  // 2^u underflows to 0 before this
};

// tanh(x) in float32, a few ulp: odd polynomial (Cephes tanhf) for |x| < 0.625,
// 1 - 2 / (exp(2|x|) + 1) with the sign of x above.  NaN gives NaN.
template <typename B = BaseE>
IQ_HD float tanh_(float x) {
  float ax = x < 0.0f ? -x : x;
  float z = x * x;
  float small = -5.70498872745e-3f;
  small = fma_(small, z, 2.06390887954e-2f);
  small = fma_(small, z, -5.37397155531e-2f);
  small = fma_(small, z, 1.33314422036e-1f);
  small = fma_(small, z, -3.33332819422e-1f);
  small = fma_(small * z, x, x);
  float e = B::pow(B::scale(2.0f) * ax);
  float big = 1.0f - 2.0f / (e + 1.0f);
  big = x < 0.0f ? -big : big;
  return ax < 0.625f ? small : big;
}

// The soft-capped logit c * tanh(z / c); inv_cap = 1 / c, or 0 for no cap.
template <typename B = BaseE>
IQ_HD float softcap(float z, float cap, float inv_cap) {
  return inv_cap > 0.0f ? cap * tanh_<B>(z * inv_cap) : z;
}

// d(c * tanh(z / c)) / dz at the capped logit z_c: 1 - (z_c / c)^2.
IQ_HD float softcap_grad(float capped, float inv_cap) {
  float t = capped * inv_cap;
  return 1.0f - t * t;
}

// The policy's part of dL/dz of one logit, grad_value * p with
// p = exp((z_c - V) / tau) (the difference first: exact where it matters, when
// z_c is close to V).  The full gradient is
// (this + grad_target * onehot) * softcap_grad(z_c).  k = B::scale(1 / tau).
template <typename B = BaseE>
IQ_HD float policy_grad(float capped, float value, float k, float grad_value) {
  return grad_value * B::pow((capped - value) * k);
}

// The shift of a row's exponentials: its max, or 0 when the max is not finite
// (a row of -inf stays NaN-free and gets V = -inf, as the torch backend does).
IQ_HD float safe_shift(float m) { return (m - m == 0.0f) ? m : 0.0f; }

// Exponential of one logit relative to the shift, with u = (z_c - shift) / tau
// clamped so that e * u is 0 (not NaN) where z_c = -inf.
struct ExpTerm {
  float e;  // exp(u)
  float eu; // exp(u) * u   (for the entropy; u in base units, see BaseE / Base2)
};

template <typename B = BaseE>
IQ_HD ExpTerm exp_term(float capped, float shift, float k) {
  float u = (capped - shift) * k;
  float uc = u < B::kMinU ? B::kMinU : u;
  float e = B::pow(u);
  return ExpTerm{e, e * uc};
}

// Online log-sum-exp state of a set of logits, relative to its own max m:
//   s = sum_v exp((z_v - m) / tau),  t = sum_v exp((z_v - m) / tau) (z_v - m) / tau
// Two states merge exactly (up to rounding); an empty state has m = -inf, s = t = 0.
struct LseState {
  float m;
  float s;
  float t;
};

IQ_HD LseState lse_empty() { return LseState{neg_inf(), 0.0f, 0.0f}; }

// Rescale a state to a larger shift m_new (m_new >= a.m, m_new finite or a.s == 0).
// t is in base units (see ExpTerm); k = B::scale(1 / tau).
template <typename B = BaseE>
IQ_HD LseState lse_rescale(LseState a, float m_new, float k) {
  if (a.s == 0.0f) return LseState{m_new, 0.0f, 0.0f};
  float d = (safe_shift(a.m) - safe_shift(m_new)) * k;  // <= 0
  float f = B::pow(d);
  return LseState{m_new, a.s * f, f * fma_(d, a.s, a.t)};
}

template <typename B = BaseE>
IQ_HD LseState lse_merge(LseState a, LseState b, float k) {
  // NaN in either max poisons the result, as it should.
  float m = (a.m != a.m || b.m != b.m) ? (a.m + b.m) : (a.m > b.m ? a.m : b.m);
  LseState ra = lse_rescale<B>(a, m, k);
  LseState rb = lse_rescale<B>(b, m, k);
  return LseState{m, ra.s + rb.s, ra.t + rb.t};
}

// V = tau * log S + m (the max was the shift; a non-finite max shifts by 0).
IQ_HD float lse_value(LseState a, float tau, float log_s) {
  return safe_shift(a.m) + tau * log_s;
}

// H = log S - T / S (T in natural units: B::kLn times the base-unit sum).
template <typename B = BaseE>
IQ_HD float lse_entropy(LseState a, float log_s) { return log_s - B::kLn * a.t / a.s; }

// Running argmax: the larger value wins, the smaller index on ties, NaN wins
// (as torch.max does).  Start from {-inf, 0} so that a row of -inf reports
// index 0, like torch.
struct ArgMax {
  float v;
  int64_t i;
};

IQ_HD ArgMax argmax_merge(ArgMax a, ArgMax b) {
  bool a_nan = a.v != a.v, b_nan = b.v != b.v;
  if (a_nan || b_nan) {
    if (a_nan && b_nan) return a.i <= b.i ? a : b;
    return a_nan ? a : b;
  }
  if (a.v > b.v) return a;
  if (b.v > a.v) return b;
  return a.i <= b.i ? a : b;
}


// ------------------------------------------------ per-element steps of a row
// The CUDA kernels' (iq_cuda.cu) per-logit work, host-compilable so that
// tests/test_iq_math.py runs exactly these functions on the CPU.

// A row's running statistics: online log-sum-exp, argmax and the plain sum of
// the capped logits (Z above; 0 unless wanted).  The sum needs no shift: it
// merges by addition, in any order (threads, tiles, vocabulary shards).
struct RowState {
  LseState lse;
  ArgMax best;
  float sum;
};

IQ_HD RowState row_empty() { return RowState{lse_empty(), ArgMax{neg_inf(), 0}, 0.0f}; }

// Adds capped logit c at column idx.  NaN policy (every backend, as torch.max):
// the max used as the shift skips NaN, the sums do not (V and the logit sum
// are NaN), and the argmax / max logit report the first NaN.
template <typename B>
IQ_HD void row_accumulate(RowState& st, float c, int64_t idx, float k, bool ent, bool amax,
                          bool lsum) {
  if (c > st.lse.m) st.lse = lse_rescale<B>(st.lse, c, k);
  const ExpTerm e = exp_term<B>(c, safe_shift(st.lse.m), k);
  st.lse.s += e.e;
  if (ent) st.lse.t += e.eu;
  if (amax) st.best = argmax_merge(st.best, ArgMax{c, idx});
  if (lsum) st.sum += c;
}

template <typename B>
IQ_HD RowState row_merge(RowState a, RowState b, float k) {
  return RowState{lse_merge<B>(a.lse, b.lse, k), argmax_merge(a.best, b.best), a.sum + b.sum};
}

// dL/dz of one logit: raw logit z (or the capped one when `pre`), target column
// tg, value V, coefficients gv, gt (and gs, the uniform logit-sum coefficient,
// read only when kSum: without it the element costs what it did before);
// cap / inv_cap 0 without a soft cap.
//   d = gv p + gt [idx == tg] (+ gs),  times 1 - (z_c / c)^2 with a cap.
template <typename B, bool kCap, bool kSum = false>
IQ_HD float row_grad_elem(float z, int64_t idx, int64_t tg, float value, float k, float gv,
                          float gt, float gs, float cap, float inv_cap, bool pre) {
  const float c = (pre || !kCap) ? z : cap * tanh_<B>(z * inv_cap);
  float d = policy_grad<B>(c, value, k, gv) + (idx == tg ? gt : 0.0f);
  if (kSum) d += gs;
  if (kCap) d *= softcap_grad(c, inv_cap);
  return d;
}

}  // namespace math
}  // namespace fastirl
