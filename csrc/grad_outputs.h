// Argument checks and gradient outputs of the backward ops, shared by their CPU and
// CUDA kernels. A gradient not asked for is a distinct empty tensor: the outputs of an
// op may not alias each other.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "checks.h"

namespace shortcut_kernels {

using Grads2 = std::tuple<at::Tensor, at::Tensor>;
using Grads3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

inline at::Tensor grad_output(bool needed, const at::Tensor& like, bool zeroed = false) {
  if (!needed) return at::empty({0}, like.options());
  return zeroed ? at::zeros_like(like) : at::empty_like(like);
}

// gated_blend_backward -> (d_fresh, d_cache, d_gate); d_gate starts at zero.
inline Grads3 gated_blend_grads(const at::Tensor& grad, const at::Tensor& fresh,
                                const at::Tensor& cache, const at::Tensor& gate,
                                bool need_fresh, bool need_cache, bool need_gate) {
  check_blend_inputs(fresh, cache, gate);
  check_same(fresh, "fresh", grad, "grad");
  return {grad_output(need_fresh, fresh), grad_output(need_cache, cache),
          grad_output(need_gate, gate, /*zeroed=*/true)};
}

// gated_residual_backward -> (d_y, d_gate). Without a gate the op is x + y: dy is g
// itself (copied, as outputs may not alias inputs) and there is nothing to compute.
inline Grads2 gated_residual_grads(const at::Tensor& grad, const at::Tensor& y,
                                   const std::optional<at::Tensor>& gate, bool need_y,
                                   bool need_gate) {
  check_float_tensor(y, "y");
  check_contiguous(y, "y");
  check_same(y, "y", grad, "grad");
  TORCH_CHECK(has(gate) || !need_gate, "shortcut_kernels: need_gate without a `gate`");
  if (!has(gate))
    return {need_y ? grad.clone() : at::empty({0}, y.options()),
            at::empty({0}, y.options().dtype(acc_type_of(y.scalar_type())))};
  check_residual_gate(*gate, y);
  return {grad_output(need_y, y), grad_output(need_gate, *gate, /*zeroed=*/true)};
}

// guided_step_backward -> (d_x, d_eps_uncond, d_eps_cond); the coefficients are
// checked by check_coefs.
inline Grads3 guided_step_grads(const at::Tensor& grad, bool need_x, bool need_eps_uncond,
                                bool need_eps_cond) {
  check_float_tensor(grad, "grad");
  check_dense(grad, "grad");
  return {grad_output(need_x, grad), grad_output(need_eps_uncond, grad),
          grad_output(need_eps_cond, grad)};
}

}  // namespace shortcut_kernels
