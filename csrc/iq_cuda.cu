// CUDA epilogues of the fastirl "cuda" backend (the GEMMs around them are
// cuBLAS, called from Python).  The per-element math is iq_math.h, the same
// functions the CPU epilogues run (and the CPU tests check).
//
//   row_stats_kernel  one block per row: each thread streams its part of the
//                     row with 16-byte vector loads, keeping an online
//                     (max, sum-exp, sum e*u) state, a running argmax and
//                     (kSum) the plain sum of the capped logits in float32;
//                     warp shuffles, then shared memory, merge them.
//   row_grad_kernel   elementwise over (rows, vocabulary) with 16-byte vector
//                     loads and stores: dz = (gv p + gt onehot (+ gs)) softcap'.
// kSum is a template flag of both kernels: without a logit sum / grad_sum the
// kernels launched are exactly the ones without those terms.
// All indexing into the blocks is int64.  Rows whose start is not 16-byte
// aligned (odd vocabulary sizes) run a scalar head until it is.
//
// Compiled with -DFASTIRL_KERNELS_ONLY this file needs no torch headers and
// instantiates every kernel explicitly: tests/test_native.py builds it that way
// for sm_80 and sm_90 with -Xptxas -v to check that no kernel spills.
#include "iq_math.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

#if !defined(FASTIRL_KERNELS_ONLY)
#include "iq_ops.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#endif

namespace fastirl {
namespace cuda {

using math::ArgMax;
using math::LseState;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Element types: storage and conversions (16-bit types as raw bits, so the
// __CUDA_NO_HALF_CONVERSIONS__ family of flags torch compiles with do not matter).
struct F32 {
  using storage = float;
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float f) { return f; }
};
struct BF16 {
  using storage = uint16_t;
  static __device__ __forceinline__ float load(uint16_t v) {
    return __uint_as_float(static_cast<uint32_t>(v) << 16);
  }
  static __device__ __forceinline__ uint16_t store(float f) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
  }
};
struct F16 {
  using storage = uint16_t;
  static __device__ __forceinline__ float load(uint16_t v) {
    return __half2float(__ushort_as_half(v));
  }
  static __device__ __forceinline__ uint16_t store(float f) {
    return __half_as_ushort(__float2half_rn(f));
  }
};

// N elements of type S moved as one aligned vector (16 bytes for the widths used).
template <typename S, int N>
struct alignas(sizeof(S) * N) Pack {
  S v[N];
};

// Elements before `p` reaches an `align`-byte boundary.
template <typename S>
__device__ __forceinline__ int64_t head_elems(const S* p, int align) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  return static_cast<int64_t>(((align - a % align) % align) / sizeof(S));
}

using math::Base2;
using ThreadStats = math::RowState;

template <bool kCap>
__device__ __forceinline__ float cap_logit(float z, float cap, float inv_cap) {
  if constexpr (kCap) {
    return cap * math::tanh_<Base2>(z * inv_cap);
  } else {
    return z;
  }
}

// --------------------------------------------------------------- statistics

// (the logit sum is only exchanged when kSum: otherwise it is the constant 0)
template <bool kSum>
__device__ __forceinline__ ThreadStats shfl_xor(ThreadStats a, int lane_mask) {
  ThreadStats b;
  b.lse.m = __shfl_xor_sync(0xffffffffu, a.lse.m, lane_mask);
  b.lse.s = __shfl_xor_sync(0xffffffffu, a.lse.s, lane_mask);
  b.lse.t = __shfl_xor_sync(0xffffffffu, a.lse.t, lane_mask);
  b.best.v = __shfl_xor_sync(0xffffffffu, a.best.v, lane_mask);
  b.best.i = __shfl_xor_sync(0xffffffffu, a.best.i, lane_mask);
  b.sum = kSum ? __shfl_xor_sync(0xffffffffu, a.sum, lane_mask) : 0.0f;
  return b;
}

// One block per row (grid-stride over rows).  Outputs as the CPU op; a target
// outside [-1, V) gets NaN value and target logit (checked without a device
// sync; the engine validates targets before any kernel runs).  `k` is
// log2(e) / tau: base-2 exponentials (math::Base2).
// kSum: Z = sum_v z_c,v, the capped logits' plain sum (no shift, so threads,
// warps and the block merge it by addition: RowState::sum, math::row_merge);
// one add per logit in the loops below, NaN propagating (NaN policy).
template <typename T, bool kCap, bool kSum>
__global__ void __launch_bounds__(kThreads)
row_stats_kernel(const typename T::storage* __restrict__ z, int64_t row_stride, int64_t n,
                 int64_t V, const int64_t* __restrict__ targets, float tau, float k,
                 float cap, float inv_cap, bool ent, bool amax, float* __restrict__ value,
                 float* __restrict__ target_logit, float* __restrict__ entropy,
                 int64_t* __restrict__ argmax, float* __restrict__ max_logit,
                 float* __restrict__ logit_sum) {
  using S = typename T::storage;
  constexpr int kVec = 16 / sizeof(S);
  __shared__ ThreadStats warp_stats[kWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {
    const S* row = z + r * row_stride;
    ThreadStats st = math::row_empty();
    const int64_t head = min(head_elems(row, 16), V);
    for (int64_t i = threadIdx.x; i < head; i += kThreads)
      math::row_accumulate<Base2>(st, cap_logit<kCap>(T::load(row[i]), cap, inv_cap), i, k, ent,
                                  amax, kSum);
    const int64_t nvec = (V - head) / kVec;
    const Pack<S, kVec>* vrow = reinterpret_cast<const Pack<S, kVec>*>(row + head);
    for (int64_t vi = threadIdx.x; vi < nvec; vi += kThreads) {
      const Pack<S, kVec> p = vrow[vi];
      float c[kVec];
      float vmax = math::neg_inf();
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        c[j] = cap_logit<kCap>(T::load(p.v[j]), cap, inv_cap);
        vmax = c[j] > vmax ? c[j] : vmax;
      }
      if (vmax > st.lse.m) st.lse = math::lse_rescale<Base2>(st.lse, vmax, k);
      const float shift = math::safe_shift(st.lse.m);
      const int64_t base = head + vi * kVec;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const math::ExpTerm e = math::exp_term<Base2>(c[j], shift, k);
        st.lse.s += e.e;
        if (ent) st.lse.t += e.eu;
        if (amax) st.best = math::argmax_merge(st.best, ArgMax{c[j], base + j});
        if (kSum) st.sum += c[j];
      }
    }
    for (int64_t i = head + nvec * kVec + threadIdx.x; i < V; i += kThreads)
      math::row_accumulate<Base2>(st, cap_logit<kCap>(T::load(row[i]), cap, inv_cap), i, k, ent,
                                  amax, kSum);

#pragma unroll
    for (int off = 16; off > 0; off /= 2)
      st = math::row_merge<Base2>(st, shfl_xor<kSum>(st, off), k);
    if (lane == 0) warp_stats[warp] = st;
    __syncthreads();
    if (warp == 0) {
      st = lane < kWarps ? warp_stats[lane] : math::row_empty();
#pragma unroll
      for (int off = 16; off > 0; off /= 2)
        st = math::row_merge<Base2>(st, shfl_xor<kSum>(st, off), k);
      if (lane == 0) {
        const float log_s = logf(st.lse.s);
        const int64_t tg = targets[r];
        const bool bad = tg < -1 || tg >= V;
        const float nan = __int_as_float(0x7fc00000);
        value[r] = bad ? nan : math::lse_value(st.lse, tau, log_s);
        const float q = tg >= 0 && !bad ? cap_logit<kCap>(T::load(row[tg]), cap, inv_cap) : 0.0f;
        target_logit[r] = bad ? nan : q;
        if (ent) entropy[r] = math::lse_entropy<Base2>(st.lse, log_s);
        if (amax) {  // NaN policy: the first NaN wins (argmax_merge)
          argmax[r] = st.best.i;
          max_logit[r] = st.best.v;
        }
        if (kSum) logit_sum[r] = st.sum;
      }
    }
    __syncthreads();  // warp_stats is reused by the next row
  }
}

// ----------------------------------------------------------------- gradient

// `pre`: the block holds capped logits already (row_stats_capped_, CPU only so
// far; the flag is accepted here so that both devices share the op schema).
template <bool kCap, bool kSum>
__device__ __forceinline__ float grad_elem(float zraw, int64_t idx, int64_t tg, float value,
                                           float k, float gv, float gt, float gs, float cap,
                                           float inv_cap, bool pre) {
  return math::row_grad_elem<Base2, kCap, kSum>(zraw, idx, tg, value, k, gv, gt, gs, cap,
                                                inv_cap, pre);
}

// Grid: x over the vocabulary, y over rows (grid-stride).  `out` may be `z`
// itself (same type and strides): each element is read before it is written
// by the same thread.
// kSum: grad_sum[r] (the coefficient of dL/dZ, dZ/dz_c,v = 1) is added to every
// column before the soft-cap derivative (math::row_grad_elem): one load per
// row, one add per element; without it grad_sum is never read.
template <typename Tin, typename Tout, bool kCap, bool kSum>
__global__ void __launch_bounds__(kThreads)
row_grad_kernel(const typename Tin::storage* z, int64_t z_stride, typename Tout::storage* out,
                int64_t out_stride, int64_t n, int64_t V, const int64_t* __restrict__ targets,
                const float* __restrict__ value, const float* __restrict__ grad_value,
                const float* __restrict__ grad_target, const float* __restrict__ grad_sum,
                float k, float cap, float inv_cap, bool pre) {
  using Si = typename Tin::storage;
  using So = typename Tout::storage;
  constexpr int kVec = 16 / (sizeof(Si) > sizeof(So) ? sizeof(Si) : sizeof(So));
  const int64_t stride_x = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  for (int64_t r = blockIdx.y; r < n; r += gridDim.y) {
    const Si* zr = z + r * z_stride;
    So* orow = out + r * out_stride;
    const float v = value[r], gv = grad_value[r];
    const int64_t tg = targets[r];
    const float gt = grad_target[r];
    const float gs = kSum ? grad_sum[r] : 0.0f;
    // Vector loads need the same misalignment (in elements) of input and output.
    int64_t head = head_elems(zr, sizeof(Si) * kVec);
    if (head != head_elems(orow, sizeof(So) * kVec)) head = V;
    head = min(head, V);
    const int64_t nvec = (V - head) / kVec;
    for (int64_t i = tid; i < head; i += stride_x)
      orow[i] = Tout::store(
          grad_elem<kCap, kSum>(Tin::load(zr[i]), i, tg, v, k, gv, gt, gs, cap, inv_cap, pre));
    const auto* vin = reinterpret_cast<const Pack<Si, kVec>*>(zr + head);
    auto* vout = reinterpret_cast<Pack<So, kVec>*>(orow + head);
    for (int64_t vi = tid; vi < nvec; vi += stride_x) {
      const Pack<Si, kVec> p = vin[vi];
      Pack<So, kVec> q;
      const int64_t base = head + vi * kVec;
#pragma unroll
      for (int j = 0; j < kVec; ++j)
        q.v[j] = Tout::store(grad_elem<kCap, kSum>(Tin::load(p.v[j]), base + j, tg, v, k, gv,
                                                   gt, gs, cap, inv_cap, pre));
      vout[vi] = q;
    }
    for (int64_t i = head + nvec * kVec + tid; i < V; i += stride_x)
      orow[i] = Tout::store(
          grad_elem<kCap, kSum>(Tin::load(zr[i]), i, tg, v, k, gv, gt, gs, cap, inv_cap, pre));
  }
}

#if defined(FASTIRL_KERNELS_ONLY)

// Every kernel the launchers below can start, for the ptxas check.
#define IQ_STATS(T, CAP, SUM)                                                              \
  template __global__ void row_stats_kernel<T, CAP, SUM>(                                  \
      const T::storage*, int64_t, int64_t, int64_t, const int64_t*, float, float, float,  \
      float, bool, bool, float*, float*, float*, int64_t*, float*, float*);
#define IQ_GRAD(TI, TO, CAP, SUM)                                                           \
  template __global__ void row_grad_kernel<TI, TO, CAP, SUM>(                              \
      const TI::storage*, int64_t, TO::storage*, int64_t, int64_t, int64_t, const int64_t*, \
      const float*, const float*, const float*, const float*, float, float, float, bool);
#define IQ_GRAD_OUT(TI, CAP, SUM) \
  IQ_GRAD(TI, F32, CAP, SUM) IQ_GRAD(TI, BF16, CAP, SUM) IQ_GRAD(TI, F16, CAP, SUM)
#define IQ_ALL(CAP, SUM)                                                    \
  IQ_STATS(F32, CAP, SUM) IQ_STATS(BF16, CAP, SUM) IQ_STATS(F16, CAP, SUM) \
  IQ_GRAD_OUT(F32, CAP, SUM) IQ_GRAD_OUT(BF16, CAP, SUM) IQ_GRAD_OUT(F16, CAP, SUM)
IQ_ALL(false, false)
IQ_ALL(true, false)
IQ_ALL(false, true)
IQ_ALL(true, true)

#else  // launchers and registration

namespace {

int64_t max_grid_y() { return 65535; }

template <typename Fn>
void dispatch_type(at::ScalarType t, Fn&& fn) {
  switch (t) {
    case at::kFloat: fn(F32{}); break;
    case at::kBFloat16: fn(BF16{}); break;
    default: fn(F16{}); break;
  }
}

void check_cuda(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), "fastirl: ", name,
              " must be on the logits' device ", like.device(), ", got ", t.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
row_stats_cuda(const at::Tensor& logits, const at::Tensor& targets_in, double temperature,
               std::optional<double> softcap, bool entropy, bool argmax, bool logit_sum) {
  check_logits(logits, "logits");
  check_rows(targets_in, logits, at::kLong, "targets");
  const Spec spec = make_spec(temperature, softcap);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t n = logits.size(0), V = logits.size(1);
  const at::Tensor targets = targets_in.contiguous();
  const auto fopt = logits.options().dtype(at::kFloat);
  at::Tensor value = at::empty({n}, fopt), target_logit = at::empty({n}, fopt);
  at::Tensor ent = at::empty({entropy ? n : 0}, fopt);
  at::Tensor amax = at::empty({argmax ? n : 0}, fopt.dtype(at::kLong));
  at::Tensor maxl = at::empty({argmax ? n : 0}, fopt);
  at::Tensor zsum = at::empty({logit_sum ? n : 0}, fopt);
  if (n == 0) return {value, target_logit, ent, amax, maxl, zsum};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(n, 1 << 30));
  dispatch_type(logits.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using S = typename T::storage;
    auto launch = [&](auto kernel) {
      kernel<<<blocks, kThreads, 0, stream>>>(
          static_cast<const S*>(logits.data_ptr()), logits.stride(0), n, V,
          targets.data_ptr<int64_t>(), spec.tau, Base2::scale(spec.inv_tau), spec.cap,
          spec.inv_cap, entropy,
          argmax, value.data_ptr<float>(), target_logit.data_ptr<float>(),
          entropy ? ent.data_ptr<float>() : nullptr, argmax ? amax.data_ptr<int64_t>() : nullptr,
          argmax ? maxl.data_ptr<float>() : nullptr,
          logit_sum ? zsum.data_ptr<float>() : nullptr);
    };
    if (softcap.has_value()) {
      if (logit_sum) launch(row_stats_kernel<T, true, true>);
      else launch(row_stats_kernel<T, true, false>);
    } else {
      if (logit_sum) launch(row_stats_kernel<T, false, true>);
      else launch(row_stats_kernel<T, false, false>);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {value, target_logit, ent, amax, maxl, zsum};
}

void run_grad(const at::Tensor& logits, const at::Tensor& targets_in, const at::Tensor& value,
              const at::Tensor& grad_value, const at::Tensor& grad_target, double temperature,
              const std::optional<double>& softcap, bool is_capped, const at::Tensor& out,
              const std::optional<at::Tensor>& grad_sum) {
  check_grad_args(logits, targets_in, value, grad_value, grad_target, grad_sum);
  check_cuda(logits, logits, "logits");
  TORCH_CHECK(!is_capped || softcap.has_value(), "fastirl: capped=True needs a softcap");
  const Spec spec = make_spec(temperature, softcap);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t n = logits.size(0), V = logits.size(1);
  if (n == 0) return;
  const at::Tensor targets = targets_in.contiguous(), v = value.contiguous(),
                   gv = grad_value.contiguous(), gt = grad_target.contiguous();
  const at::Tensor gs = grad_sum.has_value() ? grad_sum->contiguous() : at::Tensor();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  // Enough blocks along the vocabulary for ~4 vectors of 8 per thread.
  const int64_t per_block = static_cast<int64_t>(kThreads) * 8 * 4;
  const dim3 grid(static_cast<unsigned>(std::max<int64_t>(1, (V + per_block - 1) / per_block)),
                  static_cast<unsigned>(std::min(n, max_grid_y())));
  dispatch_type(logits.scalar_type(), [&](auto tin) {
    dispatch_type(out.scalar_type(), [&](auto tout) {
      using Ti = decltype(tin);
      using To = decltype(tout);
      auto launch = [&](auto kernel) {
        kernel<<<grid, kThreads, 0, stream>>>(
            static_cast<const typename Ti::storage*>(logits.data_ptr()), logits.stride(0),
            static_cast<typename To::storage*>(out.data_ptr()), out.stride(0), n, V,
            targets.data_ptr<int64_t>(), v.data_ptr<float>(), gv.data_ptr<float>(),
            gt.data_ptr<float>(), gs.defined() ? gs.data_ptr<float>() : nullptr,
            Base2::scale(spec.inv_tau), spec.cap, spec.inv_cap, is_capped);
      };
      if (softcap.has_value()) {
        if (gs.defined()) launch(row_grad_kernel<Ti, To, true, true>);
        else launch(row_grad_kernel<Ti, To, true, false>);
      } else {
        if (gs.defined()) launch(row_grad_kernel<Ti, To, false, true>);
        else launch(row_grad_kernel<Ti, To, false, false>);
      }
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void row_grad_inplace_cuda(const at::Tensor& logits, const at::Tensor& targets,
                           const at::Tensor& value, const at::Tensor& grad_value,
                           const at::Tensor& grad_target, double temperature,
                           std::optional<double> softcap, bool capped,
                           const std::optional<at::Tensor>& grad_sum) {
  run_grad(logits, targets, value, grad_value, grad_target, temperature, softcap, capped, logits,
           grad_sum);
}

void row_grad_cuda(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& value,
                   const at::Tensor& grad_value, const at::Tensor& grad_target,
                   double temperature, std::optional<double> softcap, const at::Tensor& out,
                   const std::optional<at::Tensor>& grad_sum) {
  check_logits(logits, "logits");
  check_out(out, logits);
  run_grad(logits, targets, value, grad_value, grad_target, temperature, softcap, false, out,
           grad_sum);
}

}  // namespace

#endif  // FASTIRL_KERNELS_ONLY

}  // namespace cuda
}  // namespace fastirl

#if !defined(FASTIRL_KERNELS_ONLY)
TORCH_LIBRARY_IMPL(fastirl, CUDA, m) {
  m.impl("row_stats", &fastirl::cuda::row_stats_cuda);
  m.impl("row_grad_", &fastirl::cuda::row_grad_inplace_cuda);
  m.impl("row_grad", &fastirl::cuda::row_grad_cuda);
}

#if defined(FASTIRL_PYMODULE)
#include <Python.h>
// Built by setup.py as fastirl._C_cuda (an empty module whose import registers
// the CUDA kernels; fastirl._C must be imported first, it defines the ops).
extern "C" PyMODINIT_FUNC PyInit__C_cuda(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr,
                               nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
#endif
#endif
