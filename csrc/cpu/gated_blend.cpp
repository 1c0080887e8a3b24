// gated_blend on the CPU: out = residual + gate*fresh + (1-gate)*cache, gate per sample.
// Schemas of the extension's ops live with their CPU kernels (always compiled).
#include <torch/library.h>

#include "cpu_common.h"

namespace shortcut_kernels {
namespace cpu {
namespace {

// out_t: scalar_t, or float when the outputs go through bf16 tiles (cpu_common.h).
template <typename scalar_t, typename out_t, bool kResidual>
SK_CPU_CLONES void blend_loop(const scalar_t* __restrict__ fresh,
                              const scalar_t* __restrict__ cache,
                              const scalar_t* __restrict__ residual, out_t* __restrict__ out,
                              typename Io<scalar_t>::acc_t gate, int64_t n) {
  using IO = Io<scalar_t>;
  for (int64_t i = 0; i < n; ++i) {
    auto value = shortcut_math::gated_blend(IO::load(fresh + i), IO::load(cache + i), gate);
    if (kResidual) value += IO::load(residual + i);
    Io<out_t>::store(out + i, value);
  }
}

// Part of the backward: writes d_fresh/d_cache and adds g*(fresh-cache) into `lanes`
// (kLanes independent sums, so the loop vectorises; n is a multiple of kLanes except in
// a chunk's last call, so the order of the additions does not depend on the tiling).
template <typename scalar_t, typename out_t, bool kFresh, bool kCache, bool kGate>
SK_CPU_CLONES void blend_backward_loop(const scalar_t* __restrict__ grad,
                                       const scalar_t* __restrict__ fresh,
                                       const scalar_t* __restrict__ cache,
                                       out_t* __restrict__ d_fresh, out_t* __restrict__ d_cache,
                                       typename Io<scalar_t>::acc_t gate,
                                       typename Io<scalar_t>::acc_t* __restrict__ sums,
                                       int64_t n) {
  using IO = Io<scalar_t>;
  using acc_t = typename IO::acc_t;
  acc_t lanes[kLanes];
  for (int j = 0; j < kLanes; ++j) lanes[j] = sums[j];
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      acc_t g = IO::load(grad + i + j);
      if (kFresh) Io<out_t>::store(d_fresh + i + j, shortcut_math::gated_blend_grad_fresh(g, gate));
      if (kCache) Io<out_t>::store(d_cache + i + j, shortcut_math::gated_blend_grad_cache(g, gate));
      if (kGate)
        lanes[j] += shortcut_math::gated_blend_grad_gate_term(g, IO::load(fresh + i + j),
                                                              IO::load(cache + i + j));
    }
  }
  for (; i < n; ++i) {
    acc_t g = IO::load(grad + i);
    if (kFresh) Io<out_t>::store(d_fresh + i, shortcut_math::gated_blend_grad_fresh(g, gate));
    if (kCache) Io<out_t>::store(d_cache + i, shortcut_math::gated_blend_grad_cache(g, gate));
    if (kGate)
      lanes[0] += shortcut_math::gated_blend_grad_gate_term(g, IO::load(fresh + i),
                                                            IO::load(cache + i));
  }
  for (int j = 0; j < kLanes; ++j) sums[j] = lanes[j];
}

// One chunk of the backward: writes d_fresh/d_cache and returns sum(g*(fresh-cache)).
template <typename scalar_t, bool kFresh, bool kCache, bool kGate>
typename Io<scalar_t>::acc_t blend_backward_chunk(const scalar_t* grad, const scalar_t* fresh,
                                                  const scalar_t* cache, scalar_t* d_fresh,
                                                  scalar_t* d_cache,
                                                  typename Io<scalar_t>::acc_t gate, int64_t n,
                                                  bool stream) {
  using acc_t = typename Io<scalar_t>::acc_t;
  acc_t lanes[kLanes] = {};
  tiled<scalar_t>(n, stream, [&]<typename out_t>(int64_t off, int64_t count, out_t* d_f, out_t* d_c) {
    blend_backward_loop<scalar_t, out_t, kFresh, kCache, kGate>(
        grad + off, fresh + off, cache + off, d_f, d_c, gate, lanes, count);
  }, kFresh ? d_fresh : nullptr, kCache ? d_cache : nullptr);
  acc_t total = 0;
  for (int j = 0; j < kLanes; ++j) total += lanes[j];
  return total;
}

// A NaN gate would silently poison the output. On the CPU the check is free here (B
// values), so the Python wrapper leaves it to this kernel; ValueError in Python.
template <typename acc_t>
void check_gate_not_nan(const at::Tensor& gate) {
  const acc_t* g = gate.const_data_ptr<acc_t>();
  for (int64_t s = 0; s < gate.numel(); ++s)
    TORCH_CHECK_VALUE(g[s] == g[s], "gated_blend: `gate` contains NaN; a NaN gate would "
                      "silently poison the output");
}

at::Tensor gated_blend_forward(const at::Tensor& fresh, const at::Tensor& cache,
                               const at::Tensor& gate,
                               const std::optional<at::Tensor>& residual) {
  const bool has_residual = check_blend_forward(fresh, cache, gate, residual);
  if (gate.scalar_type() == at::kDouble)
    check_gate_not_nan<double>(gate);
  else
    check_gate_not_nan<float>(gate);
  at::Tensor out = at::empty_like(fresh);
  const int64_t numel = fresh.numel();
  if (numel == 0) return out;
  const int64_t per_sample = numel / std::max<int64_t>(1, gate.numel());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fresh.scalar_type(),
                                  "gated_blend_forward_cpu", [&] {
    using acc_t = typename Io<scalar_t>::acc_t;
    const scalar_t* f = fresh.const_data_ptr<scalar_t>();
    const scalar_t* c = cache.const_data_ptr<scalar_t>();
    const scalar_t* r = has_residual ? residual->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const acc_t* g = gate.const_data_ptr<acc_t>();
    const bool stream = stream_outputs(fresh.nbytes() * (has_residual ? 4 : 3));
    with_flags([&](auto kResidual_) {
      constexpr bool kResidual = decltype(kResidual_)::value;
      for_each_sample_segment(numel, per_sample, [&](int64_t s, int64_t lo, int64_t hi) {
        tiled<scalar_t>(hi - lo, stream, [&]<typename out_t>(int64_t off, int64_t count, out_t* out_tile) {
          blend_loop<scalar_t, out_t, kResidual>(f + lo + off, c + lo + off,
                                                 kResidual ? r + lo + off : nullptr, out_tile,
                                                 g[s], count);
        }, o + lo);
      });
    }, has_residual);
  });
  return out;
}

template <typename scalar_t, bool kFresh, bool kCache, bool kGate>
void run_backward(const at::Tensor& grad, const at::Tensor& fresh, const at::Tensor& cache,
                  const at::Tensor& gate, at::Tensor& d_fresh, at::Tensor& d_cache,
                  at::Tensor& d_gate) {
  using acc_t = typename Io<scalar_t>::acc_t;
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  const scalar_t* f = fresh.const_data_ptr<scalar_t>();
  const scalar_t* c = cache.const_data_ptr<scalar_t>();
  scalar_t* df = kFresh ? d_fresh.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* dc = kCache ? d_cache.mutable_data_ptr<scalar_t>() : nullptr;
  const acc_t* gates = gate.const_data_ptr<acc_t>();
  const int64_t num_samples = std::max<int64_t>(1, gate.numel());
  const int64_t per_sample = grad.numel() / num_samples;
  // Reads grad (and fresh, cache for the gate), writes the asked-for gradients.
  const bool stream = stream_outputs(grad.nbytes() * (1 + 2 * kGate + kFresh + kCache));
  auto sums = per_sample_chunked_sum<acc_t>(num_samples, per_sample,
                                            [&](int64_t s, int64_t lo, int64_t hi) {
    return blend_backward_chunk<scalar_t, kFresh, kCache, kGate>(
        g + lo, f + lo, c + lo, kFresh ? df + lo : nullptr, kCache ? dc + lo : nullptr,
        gates[s], hi - lo, stream);
  });
  if (kGate) {
    acc_t* dg = d_gate.mutable_data_ptr<acc_t>();
    for (int64_t s = 0; s < num_samples; ++s) dg[s] = static_cast<acc_t>(sums[s]);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_blend_backward(
    const at::Tensor& grad, const at::Tensor& fresh, const at::Tensor& cache,
    const at::Tensor& gate, bool need_fresh, bool need_cache, bool need_gate) {
  at::Tensor d_fresh, d_cache, d_gate;
  std::tie(d_fresh, d_cache, d_gate) =
      gated_blend_grads(grad, fresh, cache, gate, need_fresh, need_cache, need_gate);
  if (grad.numel() == 0 || !(need_fresh || need_cache || need_gate))
    return {d_fresh, d_cache, d_gate};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fresh.scalar_type(),
                                  "gated_blend_backward_cpu", [&] {
    with_flags([&](auto kFresh_, auto kCache_, auto kGate_) {
      constexpr bool kFresh = decltype(kFresh_)::value;
      constexpr bool kCache = decltype(kCache_)::value;
      constexpr bool kGate = decltype(kGate_)::value;
      run_backward<scalar_t, kFresh, kCache, kGate>(grad, fresh, cache, gate, d_fresh, d_cache, d_gate);
    }, need_fresh, need_cache, need_gate);
  });
  return {d_fresh, d_cache, d_gate};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(shortcut_kernels_ext, m) {
  m.def("gated_blend_forward(Tensor fresh, Tensor cache, Tensor gate, Tensor? residual) -> Tensor");
  m.def(
      "gated_blend_backward(Tensor grad, Tensor fresh, Tensor cache, Tensor gate, "
      "bool need_fresh, bool need_cache, bool need_gate) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(shortcut_kernels_ext, CPU, m) {
  m.impl("gated_blend_forward", &gated_blend_forward);
  m.impl("gated_blend_backward", &gated_blend_backward);
}

}  // namespace cpu
}  // namespace shortcut_kernels
