// guided_step on the CPU: x_prev = a*x + b*(eps_u + w*(eps_c - eps_u)), a and b one
// value each (a_scalar/b_scalar, or a 0-d tensor) or one value per sample ([B]), w one
// value (w_scalar, or a 0-d tensor).
// Schemas of the extension's ops live with their CPU kernels (always compiled).
#include <torch/library.h>

#include "cpu_common.h"

namespace shortcut_kernels {
namespace cpu {
namespace {

// out_t: scalar_t, or float when the outputs go through bf16 tiles (cpu_common.h).
template <typename scalar_t, typename out_t>
SK_CPU_CLONES void step_loop(const scalar_t* __restrict__ x,
                             const scalar_t* __restrict__ eps_uncond,
                             const scalar_t* __restrict__ eps_cond, out_t* __restrict__ out,
                             typename Io<scalar_t>::acc_t a, typename Io<scalar_t>::acc_t b,
                             typename Io<scalar_t>::acc_t w, int64_t n) {
  using IO = Io<scalar_t>;
  for (int64_t i = 0; i < n; ++i)
    Io<out_t>::store(out + i, shortcut_math::guided_step(IO::load(x + i), IO::load(eps_uncond + i),
                                                         IO::load(eps_cond + i), a, b, w));
}

// dx = a*g, d_eps_u = b*(1-w)*g, d_eps_c = b*w*g: one read of g, only the needed writes.
template <typename scalar_t, typename out_t, bool kX, bool kUncond, bool kCond>
SK_CPU_CLONES void step_backward_loop(const scalar_t* __restrict__ grad, out_t* __restrict__ d_x,
                                      out_t* __restrict__ d_uncond, out_t* __restrict__ d_cond,
                                      typename Io<scalar_t>::acc_t a,
                                      typename Io<scalar_t>::acc_t b,
                                      typename Io<scalar_t>::acc_t w, int64_t n) {
  using IO = Io<scalar_t>;
  for (int64_t i = 0; i < n; ++i) {
    auto g = IO::load(grad + i);
    if (kX) Io<out_t>::store(d_x + i, shortcut_math::guided_step_grad_x(g, a));
    if (kUncond) Io<out_t>::store(d_uncond + i, shortcut_math::guided_step_grad_eps_uncond(g, b, w));
    if (kCond) Io<out_t>::store(d_cond + i, shortcut_math::guided_step_grad_eps_cond(g, b, w));
  }
}

// One coefficient: a tensor (0-d or [B]) when given, the scalar otherwise.
template <typename acc_t>
struct Coef {
  const acc_t* ptr = nullptr;
  int64_t stride = 0;  // 1 for [B], 0 for one value
  acc_t scalar = 0;
  acc_t at(int64_t sample) const { return ptr != nullptr ? ptr[sample * stride] : scalar; }
};

template <typename acc_t>
Coef<acc_t> make_coef(const std::optional<at::Tensor>& t, double scalar) {
  Coef<acc_t> c;
  c.scalar = static_cast<acc_t>(scalar);
  if (t.has_value() && t->defined()) {
    c.ptr = t->const_data_ptr<acc_t>();
    c.stride = t->numel() > 1 ? 1 : 0;
  }
  return c;
}

at::Tensor guided_step_forward(const at::Tensor& x, const at::Tensor& eps_uncond,
                               const at::Tensor& eps_cond, const std::optional<at::Tensor>& a,
                               const std::optional<at::Tensor>& b,
                               const std::optional<at::Tensor>& w, double a_scalar,
                               double b_scalar, double w_scalar) {
  const int64_t samples = check_guided_step_forward(x, eps_uncond, eps_cond, a, b, w);
  at::Tensor out = at::empty_like(x);
  const int64_t numel = x.numel();
  if (numel == 0) return out;
  const int64_t per_sample = numel / samples;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "guided_step_forward_cpu", [&] {
    using acc_t = typename Io<scalar_t>::acc_t;
    const auto ca = make_coef<acc_t>(a, a_scalar), cb = make_coef<acc_t>(b, b_scalar);
    const acc_t wv = make_coef<acc_t>(w, w_scalar).at(0);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* up = eps_uncond.const_data_ptr<scalar_t>();
    const scalar_t* cp = eps_cond.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const bool stream = stream_outputs(x.nbytes() * 4);
    for_each_sample_segment(numel, per_sample, [&](int64_t s, int64_t lo, int64_t hi) {
      tiled<scalar_t>(hi - lo, stream, [&]<typename out_t>(int64_t off, int64_t count, out_t* out_tile) {
        step_loop<scalar_t, out_t>(xp + lo + off, up + lo + off, cp + lo + off, out_tile,
                                   ca.at(s), cb.at(s), wv, count);
      }, o + lo);
    });
  });
  return out;
}

template <typename scalar_t, bool kX, bool kUncond, bool kCond>
void run_backward(const at::Tensor& grad, const std::optional<at::Tensor>& a,
                  const std::optional<at::Tensor>& b, const std::optional<at::Tensor>& w,
                  double a_scalar, double b_scalar, double w_scalar, int64_t per_sample, at::Tensor& d_x, at::Tensor& d_uncond,
                  at::Tensor& d_cond) {
  using acc_t = typename Io<scalar_t>::acc_t;
  const auto ca = make_coef<acc_t>(a, a_scalar), cb = make_coef<acc_t>(b, b_scalar);
  const acc_t wv = make_coef<acc_t>(w, w_scalar).at(0);
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  scalar_t* dx = kX ? d_x.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* du = kUncond ? d_uncond.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* dc = kCond ? d_cond.mutable_data_ptr<scalar_t>() : nullptr;
  const bool stream = stream_outputs(grad.nbytes() * (1 + kX + kUncond + kCond));
  for_each_sample_segment(grad.numel(), per_sample, [&](int64_t s, int64_t lo, int64_t hi) {
    tiled<scalar_t>(hi - lo, stream, [&]<typename out_t>(int64_t off, int64_t count, out_t* tx, out_t* tu,
                                                 out_t* tc) {
      step_backward_loop<scalar_t, out_t, kX, kUncond, kCond>(g + lo + off, tx, tu, tc, ca.at(s),
                                                              cb.at(s), wv, count);
    }, kX ? dx + lo : nullptr, kUncond ? du + lo : nullptr, kCond ? dc + lo : nullptr);
  });
}

// Instantiates the kernel for the gradients asked for (at least one).
template <typename scalar_t>
void dispatch_backward(const at::Tensor& grad, const std::optional<at::Tensor>& a,
                       const std::optional<at::Tensor>& b, const std::optional<at::Tensor>& w,
                       double a_scalar, double b_scalar, double w_scalar, bool nx, bool nu, bool nc, int64_t per_sample, at::Tensor& d_x,
                       at::Tensor& d_uncond, at::Tensor& d_cond) {
  with_flags([&](auto kX_, auto kUncond_, auto kCond_) {
    constexpr bool kX = decltype(kX_)::value;
    constexpr bool kUncond = decltype(kUncond_)::value;
    constexpr bool kCond = decltype(kCond_)::value;
    run_backward<scalar_t, kX, kUncond, kCond>(grad, a, b, w, a_scalar, b_scalar, w_scalar,
                                               per_sample, d_x, d_uncond, d_cond);
  }, nx, nu, nc);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> guided_step_backward(
    const at::Tensor& grad, const std::optional<at::Tensor>& a,
    const std::optional<at::Tensor>& b, const std::optional<at::Tensor>& w, double a_scalar,
    double b_scalar, double w_scalar, bool need_x, bool need_eps_uncond, bool need_eps_cond) {
  at::Tensor d_x, d_uncond, d_cond;
  std::tie(d_x, d_uncond, d_cond) = guided_step_grads(grad, need_x, need_eps_uncond, need_eps_cond);
  const int64_t samples = check_coefs(grad, a, b, w);
  if (grad.numel() == 0 || !(need_x || need_eps_uncond || need_eps_cond))
    return {d_x, d_uncond, d_cond};
  const int64_t per_sample = grad.numel() / samples;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "guided_step_backward_cpu", [&] {
    dispatch_backward<scalar_t>(grad, a, b, w, a_scalar, b_scalar, w_scalar, need_x,
                                need_eps_uncond, need_eps_cond, per_sample, d_x, d_uncond, d_cond);
  });
  return {d_x, d_uncond, d_cond};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(shortcut_kernels_ext, m) {
  m.def(
      "guided_step_forward(Tensor x, Tensor eps_uncond, Tensor eps_cond, Tensor? a, Tensor? b, "
      "Tensor? w, float a_scalar, float b_scalar, float w_scalar) -> Tensor");
  m.def(
      "guided_step_backward(Tensor grad, Tensor? a, Tensor? b, Tensor? w, float a_scalar, "
      "float b_scalar, float w_scalar, bool need_x, bool need_eps_uncond, bool need_eps_cond) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(shortcut_kernels_ext, CPU, m) {
  m.impl("guided_step_forward", &guided_step_forward);
  m.impl("guided_step_backward", &guided_step_backward);
}

}  // namespace cpu
}  // namespace shortcut_kernels
