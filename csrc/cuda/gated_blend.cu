// gated_blend on CUDA: out = residual + gate*fresh + (1-gate)*cache, gate per sample.
#include <torch/library.h>

#include "cuda_common.cuh"

namespace shortcut_kernels {
namespace cuda {
namespace {

template <typename scalar_t, int kVec, bool kResidual>
__global__ void __launch_bounds__(kThreads)
    blend_forward_kernel(const scalar_t* __restrict__ fresh,
                         const scalar_t* __restrict__ cache,
                         const scalar_t* __restrict__ residual, scalar_t* __restrict__ out,
                         const typename AccType<scalar_t>::type* __restrict__ gate,
                         int64_t numel, int64_t per_sample) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t num_packs = numel / kVec;  // kVec divides per_sample, so numel too
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < num_packs;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t base = p * kVec;
    const acc_t g = gate[base / per_sample];  // a pack never straddles two samples
    auto f = load_pack<scalar_t, kVec>(fresh + base);
    auto c = load_pack<scalar_t, kVec>(cache + base);
    Pack<scalar_t, kVec> r;
    if (kResidual) r = load_pack<scalar_t, kVec>(residual + base);
    Pack<scalar_t, kVec> o;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      acc_t v = shortcut_math::gated_blend(to_acc(f.v[j]), to_acc(c.v[j]), g);
      if (kResidual) v += to_acc(r.v[j]);
      o.v[j] = from_acc<scalar_t>(v);
    }
    store_pack<scalar_t, kVec>(out + base, o);
  }
}

// Grid (chunks, samples): each block handles one chunk of one sample, writes the
// element gradients and one partial sum of g*(fresh-cache).
template <typename scalar_t, int kVec, bool kFresh, bool kCache, bool kGate>
__global__ void __launch_bounds__(kThreads)
    blend_backward_kernel(const scalar_t* __restrict__ grad,
                          const scalar_t* __restrict__ fresh,
                          const scalar_t* __restrict__ cache, scalar_t* __restrict__ d_fresh,
                          scalar_t* __restrict__ d_cache,
                          const typename AccType<scalar_t>::type* __restrict__ gate,
                          typename AccType<scalar_t>::type* __restrict__ partial,
                          int64_t per_sample, int64_t chunk) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t sample = blockIdx.y;
  const acc_t g = gate[sample];
  const int64_t lo = sample * per_sample + blockIdx.x * chunk;
  const int64_t hi = min(lo + chunk, (sample + 1) * per_sample);
  acc_t term = 0;
  for (int64_t base = lo + static_cast<int64_t>(threadIdx.x) * kVec; base < hi;
       base += static_cast<int64_t>(kThreads) * kVec) {
    auto gr = load_pack<scalar_t, kVec>(grad + base);
    Pack<scalar_t, kVec> f, c, df, dc;
    if (kGate) {
      f = load_pack<scalar_t, kVec>(fresh + base);
      c = load_pack<scalar_t, kVec>(cache + base);
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      acc_t gj = to_acc(gr.v[j]);
      if (kFresh) df.v[j] = from_acc<scalar_t>(shortcut_math::gated_blend_grad_fresh(gj, g));
      if (kCache) dc.v[j] = from_acc<scalar_t>(shortcut_math::gated_blend_grad_cache(gj, g));
      if (kGate)
        term += shortcut_math::gated_blend_grad_gate_term(gj, to_acc(f.v[j]), to_acc(c.v[j]));
    }
    if (kFresh) store_pack<scalar_t, kVec>(d_fresh + base, df);
    if (kCache) store_pack<scalar_t, kVec>(d_cache + base, dc);
  }
  if (kGate) {
    acc_t total = block_sum(term);
    if (threadIdx.x == 0) partial[sample * gridDim.x + blockIdx.x] = total;
  }
}

template <typename scalar_t, int kVec>
void launch_forward(const at::Tensor& fresh, const at::Tensor& cache, const at::Tensor& gate,
                    const scalar_t* residual, at::Tensor& out, int64_t per_sample) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t numel = fresh.numel();
  auto stream = c10::cuda::getCurrentCUDAStream();
  dim3 grid = grid_for(numel / kVec);
  if (residual != nullptr)
    blend_forward_kernel<scalar_t, kVec, true><<<grid, kThreads, 0, stream>>>(
        fresh.const_data_ptr<scalar_t>(), cache.const_data_ptr<scalar_t>(), residual,
        out.mutable_data_ptr<scalar_t>(), gate.const_data_ptr<acc_t>(), numel, per_sample);
  else
    blend_forward_kernel<scalar_t, kVec, false><<<grid, kThreads, 0, stream>>>(
        fresh.const_data_ptr<scalar_t>(), cache.const_data_ptr<scalar_t>(), nullptr,
        out.mutable_data_ptr<scalar_t>(), gate.const_data_ptr<acc_t>(), numel, per_sample);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor gated_blend_forward(const at::Tensor& fresh, const at::Tensor& cache,
                               const at::Tensor& gate,
                               const std::optional<at::Tensor>& residual) {
  const bool has_residual = check_blend_forward(fresh, cache, gate, residual);
  c10::cuda::CUDAGuard device_guard(fresh.device());
  at::Tensor out = at::empty_like(fresh);
  const int64_t numel = fresh.numel();
  if (numel == 0) return out;
  const int64_t per_sample = numel / std::max<int64_t>(1, gate.numel());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fresh.scalar_type(),
                                  "gated_blend_forward_cuda", [&] {
    const scalar_t* r = has_residual ? residual->const_data_ptr<scalar_t>() : nullptr;
    constexpr int kMaxVec = 16 / sizeof(scalar_t);
    if (vector_width<scalar_t>({fresh.const_data_ptr(), cache.const_data_ptr(), r,
                                out.const_data_ptr()},
                               per_sample) == kMaxVec)
      launch_forward<scalar_t, kMaxVec>(fresh, cache, gate, r, out, per_sample);
    else
      launch_forward<scalar_t, 1>(fresh, cache, gate, r, out, per_sample);
  });
  return out;
}

template <typename scalar_t, int kVec, bool kFresh, bool kCache, bool kGate>
void launch_backward(const at::Tensor& grad, const at::Tensor& fresh, const at::Tensor& cache,
                     const at::Tensor& gate, at::Tensor& d_fresh, at::Tensor& d_cache,
                     at::Tensor& d_gate) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t num_samples = std::max<int64_t>(1, gate.numel());
  const int64_t per_sample = grad.numel() / num_samples;
  // 8 packs per thread per chunk: long enough loops, enough blocks for small tensors.
  const int64_t chunk = static_cast<int64_t>(kThreads) * kVec * 8;
  const int64_t chunks = (per_sample + chunk - 1) / chunk;
  TORCH_CHECK(num_samples <= 65535, "gated_blend: at most 65535 per-sample gates");
  at::Tensor partial = at::empty({num_samples, chunks}, gate.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  blend_backward_kernel<scalar_t, kVec, kFresh, kCache, kGate>
      <<<dim3(static_cast<unsigned>(chunks), static_cast<unsigned>(num_samples)), kThreads, 0,
         stream>>>(grad.const_data_ptr<scalar_t>(), fresh.const_data_ptr<scalar_t>(),
                   cache.const_data_ptr<scalar_t>(),
                   kFresh ? d_fresh.mutable_data_ptr<scalar_t>() : nullptr,
                   kCache ? d_cache.mutable_data_ptr<scalar_t>() : nullptr,
                   gate.const_data_ptr<acc_t>(), partial.mutable_data_ptr<acc_t>(), per_sample,
                   chunk);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // A plain (atomic-free) sum over a fixed number of partials: deterministic.
  if (kGate) d_gate.copy_(partial.sum(1).view(gate.sizes()));
}

template <typename scalar_t, int kVec>
void dispatch_backward(bool nf, bool nc, bool ng, const at::Tensor& grad,
                       const at::Tensor& fresh, const at::Tensor& cache, const at::Tensor& gate,
                       at::Tensor& d_fresh, at::Tensor& d_cache, at::Tensor& d_gate) {
  with_flags([&](auto kFresh_, auto kCache_, auto kGate_) {
    constexpr bool kFresh = decltype(kFresh_)::value;
    constexpr bool kCache = decltype(kCache_)::value;
    constexpr bool kGate = decltype(kGate_)::value;
    launch_backward<scalar_t, kVec, kFresh, kCache, kGate>(grad, fresh, cache, gate, d_fresh,
                                                           d_cache, d_gate);
  }, nf, nc, ng);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_blend_backward(
    const at::Tensor& grad, const at::Tensor& fresh, const at::Tensor& cache,
    const at::Tensor& gate, bool need_fresh, bool need_cache, bool need_gate) {
  at::Tensor d_fresh, d_cache, d_gate;
  std::tie(d_fresh, d_cache, d_gate) =
      gated_blend_grads(grad, fresh, cache, gate, need_fresh, need_cache, need_gate);
  c10::cuda::CUDAGuard device_guard(fresh.device());
  if (grad.numel() == 0 || !(need_fresh || need_cache || need_gate))
    return {d_fresh, d_cache, d_gate};
  const int64_t per_sample = grad.numel() / std::max<int64_t>(1, gate.numel());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fresh.scalar_type(),
                                  "gated_blend_backward_cuda", [&] {
    constexpr int kMaxVec = 16 / sizeof(scalar_t);
    const int vec = vector_width<scalar_t>(
        {grad.const_data_ptr(), fresh.const_data_ptr(), cache.const_data_ptr(),
         need_fresh ? d_fresh.const_data_ptr() : nullptr,
         need_cache ? d_cache.const_data_ptr() : nullptr},
        per_sample);
    if (vec == kMaxVec)
      dispatch_backward<scalar_t, kMaxVec>(need_fresh, need_cache, need_gate, grad, fresh,
                                           cache, gate, d_fresh, d_cache, d_gate);
    else
      dispatch_backward<scalar_t, 1>(need_fresh, need_cache, need_gate, grad, fresh, cache,
                                     gate, d_fresh, d_cache, d_gate);
  });
  return {d_fresh, d_cache, d_gate};
}

}  // namespace

TORCH_LIBRARY_IMPL(shortcut_kernels_ext, CUDA, m) {
  m.impl("gated_blend_forward", &gated_blend_forward);
  m.impl("gated_blend_backward", &gated_blend_backward);
}

}  // namespace cuda
}  // namespace shortcut_kernels
