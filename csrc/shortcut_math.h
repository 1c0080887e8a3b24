// Per-element math of every shortcut_kernels op: the ONE definition shared by the CPU
// kernels (csrc/cpu/*.cpp) and the CUDA kernels (csrc/cuda/*.cu). The CPU tests
// therefore check the arithmetic that the CUDA kernels run.
//
// All functions take and return the accumulation type `acc_t` (float for
// fp32/fp16/bf16 storage, double for fp64); loading and storing are the callers' job.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SK_MATH_FN __host__ __device__ __forceinline__
#else
#define SK_MATH_FN inline __attribute__((always_inline))
#endif

namespace shortcut_math {

// ---- gated_blend: out = residual + gate*fresh + (1-gate)*cache -----------------
// Written as gate*fresh + (1-gate)*cache (not the lerp form) so that a hard gate of
// exactly 1 returns `fresh` bit for bit and a gate of 0 returns `cache`.
template <typename acc_t>
SK_MATH_FN acc_t gated_blend(acc_t fresh, acc_t cache, acc_t gate) {
  return gate * fresh + (acc_t(1) - gate) * cache;
}
// d_fresh = gate*g, d_cache = (1-gate)*g, and the per-element term of d_gate.
template <typename acc_t>
SK_MATH_FN acc_t gated_blend_grad_fresh(acc_t grad, acc_t gate) { return gate * grad; }
template <typename acc_t>
SK_MATH_FN acc_t gated_blend_grad_cache(acc_t grad, acc_t gate) { return (acc_t(1) - gate) * grad; }
template <typename acc_t>
SK_MATH_FN acc_t gated_blend_grad_gate_term(acc_t grad, acc_t fresh, acc_t cache) {
  return grad * (fresh - cache);
}

// ---- gated_residual: out = x + gate*y, delta = gate*y --------------------------
template <typename acc_t>
SK_MATH_FN acc_t gated_residual_delta(acc_t y, acc_t gate) { return gate * y; }
template <typename acc_t>
SK_MATH_FN acc_t gated_residual(acc_t x, acc_t delta) { return x + delta; }
// dy = gate*g; d_gate term = g*y (summed over tokens by the caller).
template <typename acc_t>
SK_MATH_FN acc_t gated_residual_grad_y(acc_t grad, acc_t gate) { return gate * grad; }
template <typename acc_t>
SK_MATH_FN acc_t gated_residual_grad_gate_term(acc_t grad, acc_t y) { return grad * y; }

// ---- cache_residual: out = x + sum_k w[k]*caches[k] (callers fold the sum) ------
// Unweighted (every w[k] = 1): acc + cache, as it always was; weighted: acc + w*cache.
template <typename acc_t>
SK_MATH_FN acc_t cache_residual_add(acc_t acc, acc_t cache) { return acc + cache; }
template <typename acc_t>
SK_MATH_FN acc_t cache_residual_fma(acc_t acc, acc_t cache, acc_t w) { return acc + w * cache; }

// ---- guided_step: x_prev = a*x + b*(eps_u + w*(eps_c - eps_u)) -----------------
template <typename acc_t>
SK_MATH_FN acc_t guided_eps(acc_t eps_uncond, acc_t eps_cond, acc_t w) {
  return eps_uncond + w * (eps_cond - eps_uncond);
}
template <typename acc_t>
SK_MATH_FN acc_t guided_step(acc_t x, acc_t eps_uncond, acc_t eps_cond, acc_t a, acc_t b,
                             acc_t w) {
  return a * x + b * guided_eps(eps_uncond, eps_cond, w);
}
// dx = a*g, d_eps_u = b*(1-w)*g, d_eps_c = b*w*g.
template <typename acc_t>
SK_MATH_FN acc_t guided_step_grad_x(acc_t grad, acc_t a) { return a * grad; }
template <typename acc_t>
SK_MATH_FN acc_t guided_step_grad_eps_uncond(acc_t grad, acc_t b, acc_t w) {
  return b * (acc_t(1) - w) * grad;
}
template <typename acc_t>
SK_MATH_FN acc_t guided_step_grad_eps_cond(acc_t grad, acc_t b, acc_t w) {
  return b * w * grad;
}

}  // namespace shortcut_math
