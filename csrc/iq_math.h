// Per-element math of the fastirl epilogues, shared by the CPU (iq_cpu.cpp)
// and CUDA (iq_cuda.cu) code so that the CPU tests exercise the very functions
// the GPU kernels run.  Everything here is branch-free straight-line float
// arithmetic (selects, no calls into libm) so that a compiler vectorises the
// CPU loops that use it and the CUDA kernels keep few registers.
//
// Contract (see fastirl/backends/base.py and shared/spec/iq-objective.md):
//   z_c  = c * tanh(z / c)                      (soft cap, optional)
//   V    = tau * logsumexp(z_c / tau)           (soft value)
//   p    = exp((z_c - V) / tau)                 (policy)
//   H    = log S - T / S, with S = sum_v e_v, T = sum_v e_v u_v,
//          u_v = (z_c,v - M) / tau, e_v = exp(u_v), M = max_v z_c,v
//   dz_v = (grad_value * p_v + grad_target * [v == target]) * (1 - (z_c,v / c)^2)
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

// tanh(x) in float32, a few ulp: odd polynomial (Cephes tanhf) for |x| < 0.625,
// 1 - 2 / (exp(2|x|) + 1) with the sign of x above.  NaN gives NaN.
IQ_HD float tanh_(float x) {
  float ax = x < 0.0f ? -x : x;
  float z = x * x;
  float small = -5.70498872745e-3f;
  small = fma_(small, z, 2.06390887954e-2f);
  small = fma_(small, z, -5.37397155531e-2f);
  small = fma_(small, z, 1.33314422036e-1f);
  small = fma_(small, z, -3.33332819422e-1f);
  small = fma_(small * z, x, x);
  float e = exp_(2.0f * ax);
  float big = 1.0f - 2.0f / (e + 1.0f);
  big = x < 0.0f ? -big : big;
  return ax < 0.625f ? small : big;
}

// The soft-capped logit c * tanh(z / c); inv_cap = 1 / c, or 0 for no cap.
IQ_HD float softcap(float z, float cap, float inv_cap) {
  return inv_cap > 0.0f ? cap * tanh_(z * inv_cap) : z;
}

// d(c * tanh(z / c)) / dz at the capped logit z_c: 1 - (z_c / c)^2.
IQ_HD float softcap_grad(float capped, float inv_cap) {
  float t = capped * inv_cap;
  return 1.0f - t * t;
}

// The policy's part of dL/dz of one logit, grad_value * p with
// p = exp((z_c - V) / tau) (the difference first: exact where it matters, when
// z_c is close to V).  The full gradient is
// (this + grad_target * onehot) * softcap_grad(z_c).
IQ_HD float policy_grad(float capped, float value, float inv_tau, float grad_value) {
  return grad_value * exp_((capped - value) * inv_tau);
}

// The shift of a row's exponentials: its max, or 0 when the max is not finite
// (a row of -inf stays NaN-free and gets V = -inf, as the torch backend does).
IQ_HD float safe_shift(float m) { return (m - m == 0.0f) ? m : 0.0f; }

// Exponential of one logit relative to the shift, with u = (z_c - shift) / tau
// clamped so that e * u is 0 (not NaN) where z_c = -inf.
struct ExpTerm {
  float e;  // exp(u)
  float eu; // exp(u) * u   (for the entropy)
};

IQ_HD ExpTerm exp_term(float capped, float shift, float inv_tau) {
  float u = (capped - shift) * inv_tau;
  float uc = u < -104.0f ? -104.0f : u;  // exp underflows to 0 before this
  float e = exp_(u);
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
IQ_HD LseState lse_rescale(LseState a, float m_new, float inv_tau) {
  if (a.s == 0.0f) return LseState{m_new, 0.0f, 0.0f};
  float d = (safe_shift(a.m) - safe_shift(m_new)) * inv_tau;  // <= 0
  float f = exp_(d);
  return LseState{m_new, a.s * f, f * fma_(d, a.s, a.t)};
}

IQ_HD LseState lse_merge(LseState a, LseState b, float inv_tau) {
  // NaN in either max poisons the result, as it should.
  float m = (a.m != a.m || b.m != b.m) ? (a.m + b.m) : (a.m > b.m ? a.m : b.m);
  LseState ra = lse_rescale(a, m, inv_tau);
  LseState rb = lse_rescale(b, m, inv_tau);
  return LseState{m, ra.s + rb.s, ra.t + rb.t};
}

// V = tau * log S + m (the max was the shift; a non-finite max shifts by 0).
IQ_HD float lse_value(LseState a, float tau, float log_s) {
  return safe_shift(a.m) + tau * log_s;
}

// H = log S - T / S.
IQ_HD float lse_entropy(LseState a, float log_s) { return log_s - a.t / a.s; }

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

}  // namespace math
}  // namespace fastirl
