// Argument checks shared by the CPU and CUDA kernels. The Python wrappers validate
// first with friendlier messages; these guard direct calls of torch.ops.shortcut_kernels_ext.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <optional>
#include <string>

namespace shortcut_kernels {

inline void check_float_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), "shortcut_kernels: `", name, "` is undefined");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "shortcut_kernels: `", name,
              "` must be a floating-point tensor, got ", t.scalar_type());
}

inline void check_same(const at::Tensor& ref, const char* ref_name, const at::Tensor& t,
                       const char* name) {
  check_float_tensor(t, name);
  TORCH_CHECK(t.sizes() == ref.sizes(), "shortcut_kernels: `", name, "` has shape ",
              t.sizes(), " but `", ref_name, "` has shape ", ref.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "shortcut_kernels: `", name,
              "` has dtype ", t.scalar_type(), " but `", ref_name, "` has dtype ",
              ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "shortcut_kernels: `", name, "` is on ",
              t.device(), " but `", ref_name, "` is on ", ref.device());
  const bool same_layout =
      (t.is_contiguous() && ref.is_contiguous()) ||
      (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast) &&
       ref.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
      (t.dim() == 5 && t.is_contiguous(at::MemoryFormat::ChannelsLast3d) &&
       ref.is_contiguous(at::MemoryFormat::ChannelsLast3d));
  TORCH_CHECK(same_layout, "shortcut_kernels: `", name, "` must share the dense layout of `",
              ref_name, "` (both contiguous or both channels_last; the Python wrapper makes "
              "them match)");
}

// The kernels walk tensors as flat arrays: they must be dense with the batch dim
// outermost (contiguous or channels_last).
inline void check_dense(const at::Tensor& t, const char* name) {
  bool dense = t.is_contiguous() ||
               (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
               (t.dim() == 5 && t.is_contiguous(at::MemoryFormat::ChannelsLast3d));
  TORCH_CHECK(dense, "shortcut_kernels: `", name,
              "` must be contiguous or channels_last (the Python wrapper copies others)");
}

// A per-sample coefficient: 0-d (one value) or [B]; returns the number of samples.
inline int64_t check_per_sample(const at::Tensor& coef, const char* name,
                                const at::Tensor& ref, at::ScalarType acc_type) {
  TORCH_CHECK(coef.scalar_type() == acc_type, "shortcut_kernels: `", name,
              "` must be ", acc_type, " (the accumulation type), got ", coef.scalar_type());
  TORCH_CHECK(coef.device() == ref.device(), "shortcut_kernels: `", name, "` is on ",
              coef.device(), " but the data is on ", ref.device());
  TORCH_CHECK(coef.is_contiguous(), "shortcut_kernels: `", name, "` must be contiguous");
  if (coef.dim() == 0) return 1;
  TORCH_CHECK(coef.dim() == 1 && ref.dim() >= 1 && coef.size(0) == ref.size(0),
              "shortcut_kernels: `", name, "` must be 0-d or have shape [B]=[",
              ref.dim() >= 1 ? ref.size(0) : 0, "], got ", coef.sizes());
  return coef.size(0);
}

inline at::ScalarType acc_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// ---- per-op input checks, the same for the CPU and the CUDA kernels ----------------

// gated_blend: fresh/cache alike and dense; gate 0-d or [B] in the accumulation dtype.
inline void check_blend_inputs(const at::Tensor& fresh, const at::Tensor& cache,
                               const at::Tensor& gate) {
  check_float_tensor(fresh, "fresh");
  check_dense(fresh, "fresh");
  check_same(fresh, "fresh", cache, "cache");
  check_per_sample(gate, "gate", fresh, acc_type_of(fresh.scalar_type()));
}

// gated_residual: [B, C] acc-dtype gate against x viewed as [B, T, C].
inline void check_residual_gate(const at::Tensor& gate, const at::Tensor& x) {
  const auto acc = acc_type_of(x.scalar_type());
  TORCH_CHECK(gate.scalar_type() == acc, "shortcut_kernels: `gate` must be ", acc,
              " (the accumulation type), got ", gate.scalar_type());
  TORCH_CHECK(gate.device() == x.device(), "shortcut_kernels: `gate` is on ", gate.device(),
              " but `x` is on ", x.device());
  TORCH_CHECK(gate.is_contiguous(), "shortcut_kernels: `gate` must be contiguous");
  TORCH_CHECK(x.dim() >= 2, "shortcut_kernels: `x` must be [B, ..., C] with a gate, got shape ",
              x.sizes());
  TORCH_CHECK(gate.dim() == 2 && gate.size(0) == x.size(0) && gate.size(1) == x.size(-1),
              "shortcut_kernels: `gate` must have shape [B, C]=[", x.size(0), ", ", x.size(-1),
              "], got ", gate.sizes());
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), "shortcut_kernels: `", name,
              "` must be contiguous (C innermost; the Python wrapper copies others)");
}

// cache_residual: at least one cache, each like x; weights (optional) one value per
// cache, contiguous, in the accumulation dtype on x's device. Returns whether weighted.
inline bool check_cache_residual_inputs(const at::Tensor& x, c10::ArrayRef<at::Tensor> caches,
                                        const std::optional<at::Tensor>& weights) {
  check_float_tensor(x, "x");
  check_dense(x, "x");
  TORCH_CHECK(!caches.empty(), "shortcut_kernels: `caches` must hold at least one tensor");
  for (size_t k = 0; k < caches.size(); ++k) {
    const std::string name = "caches[" + std::to_string(k) + "]";
    check_same(x, "x", caches[k], name.c_str());
  }
  if (!has(weights)) return false;
  const auto acc = acc_type_of(x.scalar_type());
  TORCH_CHECK(weights->scalar_type() == acc, "shortcut_kernels: `weights` must be ", acc,
              " (the accumulation type), got ", weights->scalar_type());
  TORCH_CHECK(weights->device() == x.device(), "shortcut_kernels: `weights` is on ",
              weights->device(), " but `x` is on ", x.device());
  TORCH_CHECK(weights->dim() == 1 && weights->size(0) == static_cast<int64_t>(caches.size()),
              "shortcut_kernels: `weights` must have shape [", caches.size(),
              "] (one per cache), got ", weights->sizes());
  TORCH_CHECK(weights->is_contiguous(), "shortcut_kernels: `weights` must be contiguous");
  return true;
}

// guided_step: a and b (each optional) 0-d or [B], w (optional) one value; returns the
// number of samples.
inline int64_t check_coefs(const at::Tensor& ref, const std::optional<at::Tensor>& a,
                           const std::optional<at::Tensor>& b,
                           const std::optional<at::Tensor>& w) {
  const auto acc = acc_type_of(ref.scalar_type());
  int64_t samples = 1;
  if (has(a)) samples = std::max(samples, check_per_sample(*a, "a", ref, acc));
  if (has(b)) samples = std::max(samples, check_per_sample(*b, "b", ref, acc));
  if (has(w)) {
    check_per_sample(*w, "w", ref, acc);
    TORCH_CHECK(w->dim() == 0, "shortcut_kernels: `w` must be 0-d, got ", w->sizes());
  }
  return samples;
}

// ---- forward checks, the same for the CPU and the CUDA kernels -------------------

// gated_blend_forward; returns whether a residual is given.
inline bool check_blend_forward(const at::Tensor& fresh, const at::Tensor& cache,
                                const at::Tensor& gate, const std::optional<at::Tensor>& residual) {
  check_blend_inputs(fresh, cache, gate);
  if (has(residual)) check_same(fresh, "fresh", *residual, "residual");
  return has(residual);
}

// gated_residual_forward: x, y (and cache_out) alike and contiguous, gate [B, C].
inline void check_gated_residual_forward(const at::Tensor& x, const at::Tensor& y,
                                         const std::optional<at::Tensor>& gate,
                                         const std::optional<at::Tensor>& cache_out) {
  check_float_tensor(x, "x");
  check_contiguous(x, "x");
  check_same(x, "x", y, "y");
  if (has(gate)) check_residual_gate(*gate, x);
  if (has(cache_out)) check_same(x, "x", *cache_out, "cache_out");
}

// guided_step_forward; returns the number of samples of the coefficients.
inline int64_t check_guided_step_forward(const at::Tensor& x, const at::Tensor& eps_uncond,
                                         const at::Tensor& eps_cond,
                                         const std::optional<at::Tensor>& a,
                                         const std::optional<at::Tensor>& b,
                                         const std::optional<at::Tensor>& w) {
  check_float_tensor(x, "x");
  check_dense(x, "x");
  check_same(x, "x", eps_uncond, "eps_uncond");
  check_same(x, "x", eps_cond, "eps_cond");
  return check_coefs(x, a, b, w);
}

}  // namespace shortcut_kernels
