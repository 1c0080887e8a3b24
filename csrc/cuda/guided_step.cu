// guided_step on CUDA: x_prev = a*x + b*(eps_u + w*(eps_c - eps_u)), a and b one value
// each (a_scalar/b_scalar, or a 0-d tensor) or one value per sample ([B]), w one value
// (w_scalar, or a 0-d tensor read by the kernel: no host sync).
#include <torch/library.h>

#include "cuda_common.cuh"

namespace shortcut_kernels {
namespace cuda {
namespace {

// One coefficient: a device tensor (0-d or [B]) when `ptr` is set, `scalar` otherwise.
template <typename acc_t>
struct Coef {
  const acc_t* ptr;
  int64_t stride;  // 1 for [B], 0 for one value
  acc_t scalar;
  __device__ __forceinline__ acc_t at(int64_t sample) const {
    return ptr != nullptr ? ptr[sample * stride] : scalar;
  }
};

template <typename acc_t>
Coef<acc_t> make_coef(const std::optional<at::Tensor>& t, double scalar) {
  const bool has = t.has_value() && t->defined();
  return Coef<acc_t>{has ? t->const_data_ptr<acc_t>() : nullptr,
                     has && t->numel() > 1 ? int64_t(1) : int64_t(0),
                     static_cast<acc_t>(scalar)};
}

// kPerSample: some coefficient is [B], so each pack looks up its sample (a pack never
// straddles two samples: kVec divides per_sample).
template <typename scalar_t, int kVec, bool kPerSample>
__global__ void __launch_bounds__(kThreads)
    step_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ eps_uncond,
                        const scalar_t* __restrict__ eps_cond, scalar_t* __restrict__ out,
                        Coef<typename AccType<scalar_t>::type> a,
                        Coef<typename AccType<scalar_t>::type> b,
                        Coef<typename AccType<scalar_t>::type> w, int64_t numel,
                        int64_t per_sample) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t num_packs = numel / kVec;
  acc_t av = a.at(0), bv = b.at(0);
  const acc_t wv = w.at(0);
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < num_packs;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t base = p * kVec;
    if (kPerSample) {
      const int64_t sample = base / per_sample;
      av = a.at(sample);
      bv = b.at(sample);
    }
    auto xv = load_pack<scalar_t, kVec>(x + base);
    auto u = load_pack<scalar_t, kVec>(eps_uncond + base);
    auto c = load_pack<scalar_t, kVec>(eps_cond + base);
    Pack<scalar_t, kVec> o;
#pragma unroll
    for (int j = 0; j < kVec; ++j)
      o.v[j] = from_acc<scalar_t>(shortcut_math::guided_step(
          to_acc(xv.v[j]), to_acc(u.v[j]), to_acc(c.v[j]), av, bv, wv));
    store_pack<scalar_t, kVec>(out + base, o);
  }
}

// dx = a*g, d_eps_u = b*(1-w)*g, d_eps_c = b*w*g: one read of g, only the needed writes.
template <typename scalar_t, int kVec, bool kPerSample, bool kX, bool kUncond, bool kCond>
__global__ void __launch_bounds__(kThreads)
    step_backward_kernel(const scalar_t* __restrict__ grad, scalar_t* __restrict__ d_x,
                         scalar_t* __restrict__ d_uncond, scalar_t* __restrict__ d_cond,
                         Coef<typename AccType<scalar_t>::type> a,
                         Coef<typename AccType<scalar_t>::type> b,
                         Coef<typename AccType<scalar_t>::type> w, int64_t numel,
                         int64_t per_sample) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t num_packs = numel / kVec;
  acc_t av = a.at(0), bv = b.at(0);
  const acc_t wv = w.at(0);
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < num_packs;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t base = p * kVec;
    if (kPerSample) {
      const int64_t sample = base / per_sample;
      av = a.at(sample);
      bv = b.at(sample);
    }
    auto g = load_pack<scalar_t, kVec>(grad + base);
    Pack<scalar_t, kVec> dx, du, dc;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const acc_t gj = to_acc(g.v[j]);
      if (kX) dx.v[j] = from_acc<scalar_t>(shortcut_math::guided_step_grad_x(gj, av));
      if (kUncond)
        du.v[j] = from_acc<scalar_t>(shortcut_math::guided_step_grad_eps_uncond(gj, bv, wv));
      if (kCond) dc.v[j] = from_acc<scalar_t>(shortcut_math::guided_step_grad_eps_cond(gj, bv, wv));
    }
    if (kX) store_pack<scalar_t, kVec>(d_x + base, dx);
    if (kUncond) store_pack<scalar_t, kVec>(d_uncond + base, du);
    if (kCond) store_pack<scalar_t, kVec>(d_cond + base, dc);
  }
}

template <typename scalar_t, int kVec>
void launch_forward(const at::Tensor& x, const at::Tensor& eps_uncond, const at::Tensor& eps_cond,
                    at::Tensor& out, const Coef<typename AccType<scalar_t>::type>& a,
                    const Coef<typename AccType<scalar_t>::type>& b,
                    const Coef<typename AccType<scalar_t>::type>& w, int64_t per_sample,
                    bool per_sample_coefs) {
  const int64_t numel = x.numel();
  auto stream = c10::cuda::getCurrentCUDAStream();
  dim3 grid = grid_for(numel / kVec);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* up = eps_uncond.const_data_ptr<scalar_t>();
  const scalar_t* cp = eps_cond.const_data_ptr<scalar_t>();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  if (per_sample_coefs)
    step_forward_kernel<scalar_t, kVec, true><<<grid, kThreads, 0, stream>>>(
        xp, up, cp, o, a, b, w, numel, per_sample);
  else
    step_forward_kernel<scalar_t, kVec, false><<<grid, kThreads, 0, stream>>>(
        xp, up, cp, o, a, b, w, numel, per_sample);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor guided_step_forward(const at::Tensor& x, const at::Tensor& eps_uncond,
                               const at::Tensor& eps_cond, const std::optional<at::Tensor>& a,
                               const std::optional<at::Tensor>& b,
                               const std::optional<at::Tensor>& w, double a_scalar,
                               double b_scalar, double w_scalar) {
  const int64_t samples = check_guided_step_forward(x, eps_uncond, eps_cond, a, b, w);
  c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor out = at::empty_like(x);
  const int64_t numel = x.numel();
  if (numel == 0) return out;
  const int64_t per_sample = numel / samples;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "guided_step_forward_cuda", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const auto ca = make_coef<acc_t>(a, a_scalar), cb = make_coef<acc_t>(b, b_scalar),
               cw = make_coef<acc_t>(w, w_scalar);
    constexpr int kMaxVec = 16 / sizeof(scalar_t);
    if (vector_width<scalar_t>({x.const_data_ptr(), eps_uncond.const_data_ptr(),
                                eps_cond.const_data_ptr(), out.const_data_ptr()},
                               per_sample) == kMaxVec)
      launch_forward<scalar_t, kMaxVec>(x, eps_uncond, eps_cond, out, ca, cb, cw, per_sample,
                                        samples > 1);
    else
      launch_forward<scalar_t, 1>(x, eps_uncond, eps_cond, out, ca, cb, cw, per_sample,
                                  samples > 1);
  });
  return out;
}

template <typename scalar_t, int kVec, bool kX, bool kUncond, bool kCond>
void launch_backward(const at::Tensor& grad, at::Tensor& d_x, at::Tensor& d_uncond,
                     at::Tensor& d_cond, const Coef<typename AccType<scalar_t>::type>& a,
                     const Coef<typename AccType<scalar_t>::type>& b,
                     const Coef<typename AccType<scalar_t>::type>& w, int64_t per_sample,
                     bool per_sample_coefs) {
  const int64_t numel = grad.numel();
  auto stream = c10::cuda::getCurrentCUDAStream();
  dim3 grid = grid_for(numel / kVec);
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  scalar_t* dx = kX ? d_x.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* du = kUncond ? d_uncond.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* dc = kCond ? d_cond.mutable_data_ptr<scalar_t>() : nullptr;
  if (per_sample_coefs)
    step_backward_kernel<scalar_t, kVec, true, kX, kUncond, kCond><<<grid, kThreads, 0, stream>>>(
        g, dx, du, dc, a, b, w, numel, per_sample);
  else
    step_backward_kernel<scalar_t, kVec, false, kX, kUncond, kCond><<<grid, kThreads, 0, stream>>>(
        g, dx, du, dc, a, b, w, numel, per_sample);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int kVec>
void dispatch_backward(bool nx, bool nu, bool nc, const at::Tensor& grad, at::Tensor& d_x,
                       at::Tensor& d_uncond, at::Tensor& d_cond,
                       const Coef<typename AccType<scalar_t>::type>& a,
                       const Coef<typename AccType<scalar_t>::type>& b,
                       const Coef<typename AccType<scalar_t>::type>& w, int64_t per_sample,
                       bool per_sample_coefs) {
  with_flags([&](auto kX_, auto kUncond_, auto kCond_) {
    constexpr bool kX = decltype(kX_)::value;
    constexpr bool kUncond = decltype(kUncond_)::value;
    constexpr bool kCond = decltype(kCond_)::value;
    launch_backward<scalar_t, kVec, kX, kUncond, kCond>(grad, d_x, d_uncond, d_cond, a, b, w,
                                                        per_sample, per_sample_coefs);
  }, nx, nu, nc);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> guided_step_backward(
    const at::Tensor& grad, const std::optional<at::Tensor>& a,
    const std::optional<at::Tensor>& b, const std::optional<at::Tensor>& w, double a_scalar,
    double b_scalar, double w_scalar, bool need_x, bool need_eps_uncond, bool need_eps_cond) {
  at::Tensor d_x, d_uncond, d_cond;
  std::tie(d_x, d_uncond, d_cond) = guided_step_grads(grad, need_x, need_eps_uncond, need_eps_cond);
  const int64_t samples = check_coefs(grad, a, b, w);
  c10::cuda::CUDAGuard device_guard(grad.device());
  if (grad.numel() == 0 || !(need_x || need_eps_uncond || need_eps_cond))
    return {d_x, d_uncond, d_cond};
  const int64_t per_sample = grad.numel() / samples;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "guided_step_backward_cuda", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const auto ca = make_coef<acc_t>(a, a_scalar), cb = make_coef<acc_t>(b, b_scalar),
               cw = make_coef<acc_t>(w, w_scalar);
    constexpr int kMaxVec = 16 / sizeof(scalar_t);
    const int vec = vector_width<scalar_t>(
        {grad.const_data_ptr(), need_x ? d_x.const_data_ptr() : nullptr,
         need_eps_uncond ? d_uncond.const_data_ptr() : nullptr,
         need_eps_cond ? d_cond.const_data_ptr() : nullptr},
        per_sample);
    if (vec == kMaxVec)
      dispatch_backward<scalar_t, kMaxVec>(need_x, need_eps_uncond, need_eps_cond, grad, d_x,
                                           d_uncond, d_cond, ca, cb, cw, per_sample, samples > 1);
    else
      dispatch_backward<scalar_t, 1>(need_x, need_eps_uncond, need_eps_cond, grad, d_x, d_uncond,
                                     d_cond, ca, cb, cw, per_sample, samples > 1);
  });
  return {d_x, d_uncond, d_cond};
}

}  // namespace

TORCH_LIBRARY_IMPL(shortcut_kernels_ext, CUDA, m) {
  m.impl("guided_step_forward", &guided_step_forward);
  m.impl("guided_step_backward", &guided_step_backward);
}

}  // namespace cuda
}  // namespace shortcut_kernels
