// CPU epilogues of the fastirl backends and the registration of the ops.
//
// Per block of rows (the logits of one chunk, computed by an ATen GEMM):
//   row_stats  one pass over each row, in L1-sized tiles: the tile's max, then
//              sum_v exp((z_v - max) / tau) (and sum_v e_v u_v for the entropy),
//              merged into the row's running log-sum-exp state; the tile is read
//              from memory once.  Also the target logit, argmax and max logit,
//              and (logit_sum) the row sum of the capped logits.
//   row_grad_  overwrites the block with dL/dz = (grad_value * p + grad_target *
//              onehot (+ grad_sum)) * softcap'(z), one read and one write per
//              element.
// With a soft cap, row_stats_capped_ also stores c * tanh(z / c) back into the
// block (the tile is in L1 then), so that row_grad_(capped=True) needs no tanh.
//   acc_add_   acc (float32) += src (bf16 / fp16 / float32), converting in
//              registers: the dW accumulation of low-precision GEMM partials.
// Rows are spread over threads with at::parallel_for (torch's OpenMP pool, so
// torch.set_num_threads applies); the loops along the vocabulary are written
// for the compiler to vectorise, and on x86-64 with GCC each worker is cloned
// for AVX-512, AVX2 and baseline x86-64 and picked at load time.
//
// With -DFASTIRL_KERNELS_ONLY only the kernels are compiled (no torch headers):
// tests/test_native.py builds them that way with -Wall -Wextra -Werror.
#if defined(FASTIRL_PYMODULE)
#include <Python.h>
#endif

#include "iq_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#if !defined(FASTIRL_KERNELS_ONLY)
#include "iq_ops.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#endif

#define IQ_INLINE inline __attribute__((always_inline))

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(FASTIRL_NO_CLONES)
#define IQ_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define IQ_CLONES
#endif

namespace fastirl {
namespace cpu {

using math::ArgMax;
using math::LseState;

constexpr int64_t kTile = 2048;  // floats of a row handled at once (8 KiB: stays in L1)

// Element types of the blocks: how a stored element becomes a float and back.
// 16-bit types are read and written as their bits with branch-free code that
// vectorises (c10's conversions do not).
struct F32 {
  using storage = float;
  static IQ_INLINE float load(float v) { return v; }
  static IQ_INLINE float store(float f) { return f; }
};

struct BF16 {
  using storage = uint16_t;  // c10::BFloat16 is one uint16_t
  static IQ_INLINE float load(uint16_t v) {
    return __builtin_bit_cast(float, static_cast<uint32_t>(v) << 16);
  }
  static IQ_INLINE uint16_t store(float f) {  // round to nearest even, NaN stays NaN
    const uint32_t u = __builtin_bit_cast(uint32_t, f);
    const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return static_cast<uint16_t>(f != f ? 0x7fc0u : r);
  }
};

struct F16 {
  using storage = uint16_t;  // c10::Half is one uint16_t
#if defined(__FLT16_MAX__) || defined(FASTIRL_KERNELS_ONLY)
  static IQ_INLINE float load(uint16_t v) {
    return static_cast<float>(__builtin_bit_cast(_Float16, v));
  }
  static IQ_INLINE uint16_t store(float f) {
    return __builtin_bit_cast(uint16_t, static_cast<_Float16>(f));
  }
#else
  static IQ_INLINE float load(uint16_t v) {
    return static_cast<float>(c10::Half(v, c10::Half::from_bits()));
  }
  static IQ_INLINE uint16_t store(float f) { return c10::Half(f).x; }
#endif
};

template <typename T>
IQ_INLINE float load(const typename T::storage* p, int64_t i) {
  return T::load(p[i]);
}

template <bool kCap>
IQ_INLINE float capped(float z, const Spec& s) {
  if constexpr (kCap) {
    return s.cap * math::tanh_(z * s.inv_cap);
  } else {
    (void)s;
    return z;
  }
}

// ---------------------------------------------------------------- statistics

struct StatsArgs {
  const void* z;
  int64_t row_stride;
  int64_t vocab;
  const int64_t* targets;
  Spec spec;
  float* value;
  float* target_logit;
  float* entropy;    // nullptr unless wanted
  int64_t* argmax;   // nullptr unless wanted
  float* max_logit;  // nullptr unless wanted
  float* logit_sum;  // nullptr unless wanted
  bool write_capped;  // store the capped logits back into the block
};

// kSum: Z = sum_v z_c,v, the plain sum of the capped logits (before tau).  It
// needs no shift, so it is one more reduction in the loop that already reads
// the tile for its max (in L1), partial per tile, tiles added in order:
//   Z = sum_tiles (sum_{v in tile} z_c,v)
// NaN propagates through it (the max skips NaN, the sums do not).
template <typename T, bool kCap, bool kEnt, bool kSum>
IQ_INLINE void stats_rows(const StatsArgs& a, int64_t r0, int64_t r1) {
  using S = typename T::storage;
  alignas(64) float buf[kTile];
  const Spec spec = a.spec;
  const float inv_tau = spec.inv_tau;
  const int64_t V = a.vocab;
  const bool want_argmax = a.argmax != nullptr;
  for (int64_t r = r0; r < r1; ++r) {
    const S* z = static_cast<const S*>(a.z) + r * a.row_stride;
    const int64_t tg = a.targets[r];  // read before a capped write-back
    a.target_logit[r] = tg >= 0 ? capped<kCap>(load<T>(z, tg), spec) : 0.0f;
    LseState run = math::lse_empty();
    ArgMax best{math::neg_inf(), 0};
    float zsum = 0.0f;
    for (int64_t b0 = 0; b0 < V; b0 += kTile) {
      const int64_t len = std::min(kTile, V - b0);
      const float* tile;
      if constexpr (std::is_same_v<T, F32> && !kCap) {
        tile = z + b0;
      } else {
        const S* src = z + b0;
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) buf[i] = capped<kCap>(load<T>(src, i), spec);
        tile = buf;
        if (kCap && a.write_capped) {
          S* dst = const_cast<S*>(src);  // the op's block argument is mutable then
#pragma omp simd
          for (int64_t i = 0; i < len; ++i) dst[i] = T::store(buf[i]);
        }
      }
      float m = math::neg_inf();
      if constexpr (kSum) {
        float ts = 0.0f;
#pragma omp simd reduction(max : m) reduction(+ : ts)
        for (int64_t i = 0; i < len; ++i) {
          m = tile[i] > m ? tile[i] : m;
          ts += tile[i];
        }
        zsum += ts;
      } else {
#pragma omp simd reduction(max : m)
        for (int64_t i = 0; i < len; ++i) m = tile[i] > m ? tile[i] : m;
      }
      if (want_argmax && m > best.v) {  // rare after the first tiles: find where
        int64_t i = 0;
        while (i + 1 < len && !(tile[i] == m)) ++i;
        best = ArgMax{m, b0 + i};
      }
      const float shift = math::safe_shift(m);
      float s = 0.0f, t = 0.0f;
      if constexpr (kEnt) {
#pragma omp simd reduction(+ : s, t)
        for (int64_t i = 0; i < len; ++i) {
          const math::ExpTerm e = math::exp_term(tile[i], shift, inv_tau);
          s += e.e;
          t += e.eu;
        }
      } else {
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < len; ++i) s += math::exp_term(tile[i], shift, inv_tau).e;
      }
      run = math::lse_merge(run, LseState{m, s, t}, inv_tau);
    }
    const float log_s = std::log(run.s);
    a.value[r] = math::lse_value(run, spec.tau, log_s);
    if constexpr (kEnt) a.entropy[r] = math::lse_entropy(run, log_s);
    if (want_argmax) {
      a.argmax[r] = best.i;
      a.max_logit[r] = run.m;
    }
    if constexpr (kSum) a.logit_sum[r] = zsum;
  }
}

template <typename T, bool kCap, bool kEnt>
IQ_INLINE void stats_dispatch_sum(const StatsArgs& a, int64_t r0, int64_t r1) {
  if (a.logit_sum != nullptr) stats_rows<T, kCap, kEnt, true>(a, r0, r1);
  else stats_rows<T, kCap, kEnt, false>(a, r0, r1);
}

template <typename T>
IQ_INLINE void stats_dispatch(const StatsArgs& a, bool cap, bool ent, int64_t r0, int64_t r1) {
  if (cap) {
    if (ent) stats_dispatch_sum<T, true, true>(a, r0, r1);
    else stats_dispatch_sum<T, true, false>(a, r0, r1);
  } else {
    if (ent) stats_dispatch_sum<T, false, true>(a, r0, r1);
    else stats_dispatch_sum<T, false, false>(a, r0, r1);
  }
}

// The workers: rows [r0, r1) of a block.  Cloned per ISA (see IQ_CLONES).
IQ_CLONES void stats_range(const StatsArgs& a, Dtype dtype, bool cap, bool ent, int64_t r0,
                           int64_t r1) {
  switch (dtype) {
    case Dtype::kF32: stats_dispatch<F32>(a, cap, ent, r0, r1); break;
    case Dtype::kBF16: stats_dispatch<BF16>(a, cap, ent, r0, r1); break;
    case Dtype::kF16: stats_dispatch<F16>(a, cap, ent, r0, r1); break;
  }
}

// ----------------------------------------------------------------- gradient

struct GradArgs {
  const void* z;
  int64_t z_stride;
  void* out;
  int64_t out_stride;
  int64_t vocab;
  const int64_t* targets;
  const float* value;
  const float* grad_value;
  const float* grad_target;
  const float* grad_sum;  // nullptr: no uniform term (the kSum = false kernels run)
  Spec spec;
};

// How the gradient kernel sees the block: no soft cap, raw logits to cap, or
// logits capped already (by row_stats_capped_).
enum class Cap { kNone, kRaw, kCapped };

template <Cap kMode>
IQ_INLINE float capped_in(float z, const Spec& s) {
  if constexpr (kMode == Cap::kRaw) return capped<true>(z, s);
  else return z;
}

// out may be z itself (same dtype): every element is read before it is written,
// and the target's logit is read before the loop.
// kSum: dL/dz_c,v gains grad_sum (the coefficient of dL/dZ, Z = sum_v z_c,v,
// dZ/dz_c,v = 1): one add per element in the same loop, before the soft-cap
// derivative, which the chain rule applies to it as to the other two terms.
template <typename Tin, typename Tout, Cap kMode, bool kSum>
IQ_INLINE void grad_rows(const GradArgs& a, int64_t r0, int64_t r1) {
  constexpr bool kCap = kMode != Cap::kNone;
  using Si = typename Tin::storage;
  using So = typename Tout::storage;
  const Spec spec = a.spec;
  const float inv_tau = spec.inv_tau;
  const int64_t V = a.vocab;
  for (int64_t r = r0; r < r1; ++r) {
    const Si* z = static_cast<const Si*>(a.z) + r * a.z_stride;
    So* o = static_cast<So*>(a.out) + r * a.out_stride;
    const float value = a.value[r], gv = a.grad_value[r];
    const float gs = kSum ? a.grad_sum[r] : 0.0f;
    const int64_t tg = a.targets[r];
    const float zt = tg >= 0 ? capped_in<kMode>(load<Tin>(z, tg), spec) : 0.0f;
#pragma omp simd
    for (int64_t i = 0; i < V; ++i) {
      const float c = capped_in<kMode>(load<Tin>(z, i), spec);
      float d = math::policy_grad(c, value, inv_tau, gv);
      if constexpr (kSum) d += gs;
      if constexpr (kCap) d *= math::softcap_grad(c, spec.inv_cap);
      o[i] = Tout::store(d);
    }
    if (tg >= 0) {
      float d = math::policy_grad(zt, value, inv_tau, gv) + a.grad_target[r];
      if constexpr (kSum) d += gs;
      if constexpr (kCap) d *= math::softcap_grad(zt, spec.inv_cap);
      o[tg] = Tout::store(d);
    }
  }
}

template <typename Tin, typename Tout, Cap kMode>
IQ_INLINE void grad_dispatch_sum(const GradArgs& a, int64_t r0, int64_t r1) {
  if (a.grad_sum != nullptr) grad_rows<Tin, Tout, kMode, true>(a, r0, r1);
  else grad_rows<Tin, Tout, kMode, false>(a, r0, r1);
}

// A capped block only occurs in place (in == out), which is all that is
// instantiated for it.
template <typename Tin, typename Tout>
IQ_INLINE void grad_dispatch_cap(const GradArgs& a, Cap cap, int64_t r0, int64_t r1) {
  switch (cap) {
    case Cap::kNone: grad_dispatch_sum<Tin, Tout, Cap::kNone>(a, r0, r1); break;
    case Cap::kRaw: grad_dispatch_sum<Tin, Tout, Cap::kRaw>(a, r0, r1); break;
    case Cap::kCapped:
      if constexpr (std::is_same_v<Tin, Tout>)
        grad_dispatch_sum<Tin, Tout, Cap::kCapped>(a, r0, r1);
      break;
  }
}

template <typename Tin>
IQ_INLINE void grad_dispatch_out(const GradArgs& a, Dtype out, Cap cap, int64_t r0, int64_t r1) {
  switch (out) {
    case Dtype::kF32: grad_dispatch_cap<Tin, F32>(a, cap, r0, r1); break;
    case Dtype::kBF16: grad_dispatch_cap<Tin, BF16>(a, cap, r0, r1); break;
    case Dtype::kF16: grad_dispatch_cap<Tin, F16>(a, cap, r0, r1); break;
  }
}

IQ_CLONES void grad_range(const GradArgs& a, Dtype in, Dtype out, Cap cap, int64_t r0,
                          int64_t r1) {
  switch (in) {
    case Dtype::kF32: grad_dispatch_out<F32>(a, out, cap, r0, r1); break;
    case Dtype::kBF16: grad_dispatch_out<BF16>(a, out, cap, r0, r1); break;
    case Dtype::kF16: grad_dispatch_out<F16>(a, out, cap, r0, r1); break;
  }
}

// ------------------------------------------------------- float32 accumulation

// acc[r, :] += src[r, :] for rows [r0, r1): the float32 dW accumulator plus a
// low-precision GEMM partial, converted in registers (torch's mixed-dtype
// add_ first copies the partial to a float32 temporary: twice the traffic).
template <typename T>
IQ_INLINE void acc_rows(float* acc, int64_t acc_stride, const void* src, int64_t src_stride,
                        int64_t cols, int64_t r0, int64_t r1) {
  using S = typename T::storage;
  for (int64_t r = r0; r < r1; ++r) {
    float* a = acc + r * acc_stride;
    const S* x = static_cast<const S*>(src) + r * src_stride;
#pragma omp simd
    for (int64_t i = 0; i < cols; ++i) a[i] += T::load(x[i]);
  }
}

IQ_CLONES void acc_range(float* acc, int64_t acc_stride, const void* src, int64_t src_stride,
                         Dtype dtype, int64_t cols, int64_t r0, int64_t r1) {
  switch (dtype) {
    case Dtype::kF32: acc_rows<F32>(acc, acc_stride, src, src_stride, cols, r0, r1); break;
    case Dtype::kBF16: acc_rows<BF16>(acc, acc_stride, src, src_stride, cols, r0, r1); break;
    case Dtype::kF16: acc_rows<F16>(acc, acc_stride, src, src_stride, cols, r0, r1); break;
  }
}

}  // namespace cpu

#if !defined(FASTIRL_KERNELS_ONLY)
namespace {

using namespace cpu;

Dtype dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return Dtype::kF32;
    case at::kBFloat16: return Dtype::kBF16;
    case at::kHalf: return Dtype::kF16;
    default: TORCH_CHECK(false, "fastirl: unsupported dtype ", t);
  }
}

// ---------------------------------------------------------------------- ops

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fastirl: ", name, " must be a CPU tensor here, got ",
              t.device());
}

// Targets must be -1 (no action) or a vocabulary index; checked before any
// kernel runs so that a bad index is a Python exception, not a wild read.
void check_targets(const int64_t* tg, int64_t n, int64_t vocab) {
  bool bad = false;
  for (int64_t i = 0; i < n; ++i) bad |= (tg[i] < -1) | (tg[i] >= vocab);
  if (!bad) return;
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(tg[i] >= -1 && tg[i] < vocab, "fastirl: targets[", i, "] = ", tg[i],
                " is out of range: expected -1 (no action) or an index in [0, ", vocab, ")");
}

// Rows per thread task: enough elements that scheduling is negligible.
int64_t grain_rows(int64_t vocab) { return std::max<int64_t>(1, 32768 / vocab); }

// value, target_logit, entropy, argmax, max_logit, logit_sum
using Stats =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Stats run_stats(const at::Tensor& logits, const at::Tensor& targets_in, double temperature,
                const std::optional<double>& softcap, bool entropy, bool argmax,
                bool logit_sum, bool write_capped) {
  check_logits(logits, "logits");
  check_rows(targets_in, logits, at::kLong, "targets");
  check_cpu(logits, "logits");
  const Spec spec = make_spec(temperature, softcap);
  const int64_t n = logits.size(0), V = logits.size(1);
  const at::Tensor targets = targets_in.contiguous();
  check_targets(targets.data_ptr<int64_t>(), n, V);

  const auto fopt = logits.options().dtype(at::kFloat);
  at::Tensor value = at::empty({n}, fopt);
  at::Tensor target_logit = at::empty({n}, fopt);
  at::Tensor ent = at::empty({entropy ? n : 0}, fopt);
  at::Tensor amax = at::empty({argmax ? n : 0}, fopt.dtype(at::kLong));
  at::Tensor maxl = at::empty({argmax ? n : 0}, fopt);
  at::Tensor zsum = at::empty({logit_sum ? n : 0}, fopt);
  if (n == 0) return {value, target_logit, ent, amax, maxl, zsum};

  const StatsArgs a{logits.data_ptr(),
                    logits.stride(0),
                    V,
                    targets.data_ptr<int64_t>(),
                    spec,
                    value.data_ptr<float>(),
                    target_logit.data_ptr<float>(),
                    entropy ? ent.data_ptr<float>() : nullptr,
                    argmax ? amax.data_ptr<int64_t>() : nullptr,
                    argmax ? maxl.data_ptr<float>() : nullptr,
                    logit_sum ? zsum.data_ptr<float>() : nullptr,
                    write_capped};
  const Dtype dtype = dtype_of(logits.scalar_type());
  const bool cap = softcap.has_value();
  at::parallel_for(0, n, grain_rows(V), [&](int64_t r0, int64_t r1) {
    stats_range(a, dtype, cap, entropy, r0, r1);
  });
  return {value, target_logit, ent, amax, maxl, zsum};
}

Stats row_stats_cpu(const at::Tensor& logits, const at::Tensor& targets, double temperature,
                    std::optional<double> softcap, bool entropy, bool argmax, bool logit_sum) {
  return run_stats(logits, targets, temperature, softcap, entropy, argmax, logit_sum, false);
}

Stats row_stats_capped_cpu(const at::Tensor& logits, const at::Tensor& targets,
                           double temperature, double softcap, bool entropy, bool argmax,
                           bool logit_sum) {
  return run_stats(logits, targets, temperature, softcap, entropy, argmax, logit_sum, true);
}

void run_grad(const at::Tensor& logits, const at::Tensor& targets_in, const at::Tensor& value,
              const at::Tensor& grad_value, const at::Tensor& grad_target, double temperature,
              const std::optional<double>& softcap, bool is_capped, const at::Tensor& out,
              const std::optional<at::Tensor>& grad_sum) {
  check_grad_args(logits, targets_in, value, grad_value, grad_target, grad_sum);
  TORCH_CHECK(!is_capped || softcap.has_value(), "fastirl: capped=True needs a softcap");
  check_cpu(logits, "logits");
  const Spec spec = make_spec(temperature, softcap);
  const int64_t n = logits.size(0), V = logits.size(1);
  if (n == 0) return;
  const at::Tensor targets = targets_in.contiguous();
  check_targets(targets.data_ptr<int64_t>(), n, V);
  const at::Tensor v = value.contiguous(), gv = grad_value.contiguous(),
                   gt = grad_target.contiguous();
  const at::Tensor gs = grad_sum.has_value() ? grad_sum->contiguous() : at::Tensor();
  const GradArgs a{logits.data_ptr(),
                   logits.stride(0),
                   out.data_ptr(),
                   out.stride(0),
                   V,
                   targets.data_ptr<int64_t>(),
                   v.data_ptr<float>(),
                   gv.data_ptr<float>(),
                   gt.data_ptr<float>(),
                   gs.defined() ? gs.data_ptr<float>() : nullptr,
                   spec};
  const Dtype in = dtype_of(logits.scalar_type()), od = dtype_of(out.scalar_type());
  const Cap cap = !softcap.has_value() ? Cap::kNone : is_capped ? Cap::kCapped : Cap::kRaw;
  TORCH_CHECK(cap != Cap::kCapped || in == od, "fastirl: a capped block is only updated in place");
  at::parallel_for(0, n, grain_rows(V), [&](int64_t r0, int64_t r1) {
    grad_range(a, in, od, cap, r0, r1);
  });
}

void row_grad_inplace_cpu(const at::Tensor& logits, const at::Tensor& targets,
                          const at::Tensor& value, const at::Tensor& grad_value,
                          const at::Tensor& grad_target, double temperature,
                          std::optional<double> softcap, bool capped,
                          const std::optional<at::Tensor>& grad_sum) {
  run_grad(logits, targets, value, grad_value, grad_target, temperature, softcap, capped, logits,
           grad_sum);
}

void row_grad_cpu(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& value,
                  const at::Tensor& grad_value, const at::Tensor& grad_target,
                  double temperature, std::optional<double> softcap, const at::Tensor& out,
                  const std::optional<at::Tensor>& grad_sum) {
  check_logits(logits, "logits");
  check_out(out, logits);
  run_grad(logits, targets, value, grad_value, grad_target, temperature, softcap, false, out,
           grad_sum);
}

void acc_add_cpu(const at::Tensor& acc, const at::Tensor& src) {
  check_cpu(acc, "acc");
  check_cpu(src, "src");
  TORCH_CHECK(acc.scalar_type() == at::kFloat, "fastirl: acc must be float32, got ",
              acc.scalar_type());
  TORCH_CHECK(acc.dim() == 2 && src.dim() == 2 && acc.sizes() == src.sizes(),
              "fastirl: acc and src must be 2-D of one shape, got ", acc.sizes(), " and ",
              src.sizes());
  TORCH_CHECK(acc.size(1) <= 1 || (acc.stride(1) == 1 && src.stride(1) == 1),
              "fastirl: acc and src need unit column strides");
  const int64_t rows = acc.size(0), cols = acc.size(1);
  if (rows == 0 || cols == 0) return;
  float* a = acc.data_ptr<float>();
  const void* x = src.data_ptr();
  const int64_t as = acc.stride(0), xs = src.stride(0);
  const Dtype dt = dtype_of(src.scalar_type());
  at::parallel_for(0, rows, grain_rows(cols), [&](int64_t r0, int64_t r1) {
    acc_range(a, as, x, xs, dt, cols, r0, r1);
  });
}

}  // namespace
#endif  // !FASTIRL_KERNELS_ONLY
}  // namespace fastirl

#if !defined(FASTIRL_KERNELS_ONLY)
TORCH_LIBRARY(fastirl, m) {
  m.def(fastirl::kSchemaRowStats);
  m.def(fastirl::kSchemaRowStatsCapped);
  m.def(fastirl::kSchemaRowGradInplace);
  m.def(fastirl::kSchemaRowGrad);
  m.def("acc_add_(Tensor(a!) acc, Tensor src) -> ()");
}

TORCH_LIBRARY_IMPL(fastirl, CPU, m) {
  m.impl("row_stats", &fastirl::row_stats_cpu);
  m.impl("row_stats_capped_", &fastirl::row_stats_capped_cpu);
  m.impl("row_grad_", &fastirl::row_grad_inplace_cpu);
  m.impl("row_grad", &fastirl::row_grad_cpu);
  m.impl("acc_add_", &fastirl::acc_add_cpu);
}

#if defined(FASTIRL_PYMODULE)
// Built by setup.py as the Python module fastirl._C: importing it registers the
// ops (the module itself is empty).
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr,
                               nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
#endif
#endif  // !FASTIRL_KERNELS_ONLY
