// Argument checks and the op schemas shared by the CPU and CUDA
// implementations of the fastirl epilogue ops (host code only).
#pragma once

#include "iq_math.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>

namespace fastirl {

// Schemas of the ops; defined once, in iq_cpu.cpp (TORCH_LIBRARY(fastirl, m)).
//
// row_stats:         per-row statistics of a (n, V) logits block, raw (not capped):
//                    returns (value (n,), target_logit (n,), entropy (n,) or (0,),
//                    argmax int64 (n,) or (0,), max_logit (n,) or (0,),
//                    logit_sum (n,) or (0,)), float32 except argmax.  logit_sum
//                    is the row sum of the capped logits (before the temperature).
// row_stats_capped_: the same with a soft cap, and the block is overwritten with
//                    the capped logits c * tanh(z / c) (CPU only), so that
//                    row_grad_(..., capped=True) needs no second tanh.
// row_grad_:         overwrites the logits block (raw, or capped when `capped`)
//                    with dL/dz.
// row_grad:          writes dL/dz of the raw logits block into `out` (n, V),
//                    which must not overlap `logits` (use row_grad_ for that).
// grad_sum (both row_grad ops): float32 (n,) added to every column of dL/dz
//                    before the soft-cap derivative, or None (no such term; the
//                    kernels without it run).
inline constexpr const char* kSchemaRowStats =
    "row_stats(Tensor logits, Tensor targets, float temperature, float? softcap, "
    "bool entropy, bool argmax, bool logit_sum=False) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)";
inline constexpr const char* kSchemaRowStatsCapped =
    "row_stats_capped_(Tensor(a!) logits, Tensor targets, float temperature, float softcap, "
    "bool entropy, bool argmax, bool logit_sum=False) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)";
inline constexpr const char* kSchemaRowGradInplace =
    "row_grad_(Tensor(a!) logits, Tensor targets, Tensor value, Tensor grad_value, "
    "Tensor grad_target, float temperature, float? softcap, bool capped=False, "
    "Tensor? grad_sum=None) -> ()";
inline constexpr const char* kSchemaRowGrad =
    "row_grad(Tensor logits, Tensor targets, Tensor value, Tensor grad_value, "
    "Tensor grad_target, float temperature, float? softcap, Tensor(a!) out, "
    "Tensor? grad_sum=None) -> ()";

inline Spec make_spec(double temperature, const std::optional<double>& softcap) {
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0.0,
              "fastirl: temperature must be a finite number > 0, got ", temperature);
  Spec s{static_cast<float>(temperature), static_cast<float>(1.0 / temperature), 0.0f, 0.0f};
  TORCH_CHECK(s.tau > 0.0f && std::isfinite(s.inv_tau),
              "fastirl: temperature ", temperature, " is out of float32 range");
  if (softcap.has_value()) {
    TORCH_CHECK(std::isfinite(*softcap) && *softcap > 0.0,
                "fastirl: softcap must be a finite number > 0 or None, got ", *softcap);
    s.cap = static_cast<float>(*softcap);
    s.inv_cap = static_cast<float>(1.0 / *softcap);
    TORCH_CHECK(s.cap > 0.0f && s.inv_cap > 0.0f && std::isfinite(s.inv_cap),
                "fastirl: softcap ", *softcap, " is out of float32 range");
  }
  return s;
}

inline bool is_logit_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// A (n, V) logits block: float32 / bfloat16 / float16, unit stride along the
// vocabulary (any stride when V == 1: only element 0 of a row is read), any
// row stride.
inline void check_logits(const at::Tensor& z, const char* name) {
  TORCH_CHECK(z.dim() == 2, "fastirl: ", name, " must be 2-D (rows, vocab), got shape ",
              z.sizes());
  TORCH_CHECK(is_logit_dtype(z.scalar_type()), "fastirl: ", name,
              " must be float32, bfloat16 or float16, got ", z.scalar_type());
  TORCH_CHECK(z.size(1) >= 1, "fastirl: ", name, " has an empty vocabulary");
  TORCH_CHECK(z.stride(1) == 1 || z.size(1) == 1 || z.size(0) == 0, "fastirl: ", name,
              " must be contiguous along the vocabulary (stride(1) == 1), got strides ",
              z.strides());
  TORCH_CHECK(z.size(0) <= 1 || z.stride(0) >= z.size(1), "fastirl: ", name,
              " rows overlap (stride(0) = ", z.stride(0), " < vocab = ", z.size(1), ")");
}

// A per-row (n,) tensor of the given dtype on the device of `like`.
inline void check_rows(const at::Tensor& t, const at::Tensor& like, at::ScalarType dtype,
                       const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == like.size(0), "fastirl: ", name,
              " must have shape (", like.size(0), ",), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "fastirl: ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "fastirl: ", name, " is on ", t.device(),
              " but the logits are on ", like.device());
}

inline void check_grad_args(const at::Tensor& logits, const at::Tensor& targets,
                            const at::Tensor& value, const at::Tensor& grad_value,
                            const at::Tensor& grad_target,
                            const std::optional<at::Tensor>& grad_sum) {
  check_logits(logits, "logits");
  check_rows(targets, logits, at::kLong, "targets");
  check_rows(value, logits, at::kFloat, "value");
  check_rows(grad_value, logits, at::kFloat, "grad_value");
  check_rows(grad_target, logits, at::kFloat, "grad_target");
  if (grad_sum.has_value()) check_rows(*grad_sum, logits, at::kFloat, "grad_sum");
}

inline void check_out(const at::Tensor& out, const at::Tensor& logits) {
  check_logits(out, "out");
  TORCH_CHECK(out.sizes() == logits.sizes(), "fastirl: out must have the logits' shape ",
              logits.sizes(), ", got ", out.sizes());
  TORCH_CHECK(out.device() == logits.device(), "fastirl: out is on ", out.device(),
              " but the logits are on ", logits.device());
  if (out.numel() == 0) return;
  // Element ranges spanned by the two blocks must not overlap.
  auto lo = [](const at::Tensor& t) { return static_cast<const char*>(t.data_ptr()); };
  auto hi = [](const at::Tensor& t) {
    return static_cast<const char*>(t.data_ptr()) +
           ((t.size(0) - 1) * t.stride(0) + t.size(1)) * t.element_size();
  };
  TORCH_CHECK(hi(out) <= lo(logits) || hi(logits) <= lo(out),
              "fastirl: row_grad: out overlaps logits; use row_grad_ to write in place");
}

}  // namespace fastirl
