// gated_residual on CUDA: out = x + gate*y, x and y viewed as [B, T, C] (C innermost),
// gate [B, C] broadcast over the T tokens; optionally delta = gate*y into `cache_out`.
#include <torch/library.h>

#include "cuda_common.cuh"

namespace shortcut_kernels {
namespace cuda {
namespace {

// Grid-stride over packs of kVec elements. With a gate kVec divides C, so a pack lies in
// one row and covers channels c .. c+kVec-1 of one sample. index_t is 32-bit whenever
// the tensor allows it (cheaper divisions).
template <typename scalar_t, int kVec, bool kGate, bool kCache, typename index_t>
__global__ void __launch_bounds__(kThreads)
    residual_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
                            const typename AccType<scalar_t>::type* __restrict__ gate,
                            scalar_t* __restrict__ out, scalar_t* __restrict__ cache,
                            index_t numel, index_t per_sample, index_t channels) {
  using acc_t = typename AccType<scalar_t>::type;
  const index_t num_packs = numel / kVec;
  for (index_t p = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; p < num_packs;
       p += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t base = p * kVec;
    const acc_t* g = nullptr;
    if (kGate) g = gate + (base / per_sample) * channels + base % channels;
    auto xv = load_pack<scalar_t, kVec>(x + base);
    auto yv = load_pack<scalar_t, kVec>(y + base);
    Pack<scalar_t, kVec> o, d;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      acc_t delta = to_acc(yv.v[j]);
      if (kGate) delta = shortcut_math::gated_residual_delta(delta, __ldg(g + j));
      if (kCache) d.v[j] = from_acc<scalar_t>(delta);
      o.v[j] = from_acc<scalar_t>(shortcut_math::gated_residual(to_acc(xv.v[j]), delta));
    }
    store_pack<scalar_t, kVec>(out + base, o);
    if (kCache) store_pack<scalar_t, kVec>(cache + base, d);
  }
}

// Backward tiles: 32 columns of kVec channels (one warp reads 32 consecutive packs of a
// token row) x kRows token rows.
constexpr int kCols = 32;
constexpr int kRows = kThreads / kCols;
// Tokens per block of the reduction (more when the grid's y limit requires it).
constexpr int64_t kChunkTokens = 32;

// Grid (channel tiles, token chunks, samples): writes dy = gate*g for its tile and one
// partial sum of g*y per channel, reduced over the block's rows in a fixed order.
template <typename scalar_t, int kVec, bool kY, bool kGate>
__global__ void __launch_bounds__(kThreads)
    residual_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ y,
                             const typename AccType<scalar_t>::type* __restrict__ gate,
                             scalar_t* __restrict__ d_y,
                             typename AccType<scalar_t>::type* __restrict__ partial,
                             int64_t tokens, int64_t channels, int64_t chunk_tokens) {
  using acc_t = typename AccType<scalar_t>::type;
  const int col = threadIdx.x % kCols, row = threadIdx.x / kCols;
  const int64_t sample = blockIdx.z, chunk = blockIdx.y;
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * kCols + col) * kVec;
  const bool active = c < channels;  // kVec divides C: a pack is all in or all out
  acc_t gv[kVec], sum[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    gv[j] = (kY && active) ? gate[sample * channels + c + j] : acc_t(0);
    sum[j] = 0;
  }
  const int64_t t0 = chunk * chunk_tokens, t1 = min(t0 + chunk_tokens, tokens);
  if (active) {
    for (int64_t t = t0 + row; t < t1; t += kRows) {
      const int64_t off = (sample * tokens + t) * channels + c;
      auto gr = load_pack<scalar_t, kVec>(grad + off);
      Pack<scalar_t, kVec> yv, dy;
      if (kGate) yv = load_pack<scalar_t, kVec>(y + off);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        acc_t gj = to_acc(gr.v[j]);
        if (kY) dy.v[j] = from_acc<scalar_t>(shortcut_math::gated_residual_grad_y(gj, gv[j]));
        if (kGate) sum[j] += shortcut_math::gated_residual_grad_gate_term(gj, to_acc(yv.v[j]));
      }
      if (kY) store_pack<scalar_t, kVec>(d_y + off, dy);
    }
  }
  if (kGate) {
    __shared__ acc_t rows_sum[kRows][kCols * kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) rows_sum[row][col * kVec + j] = sum[j];
    __syncthreads();
    if (row == 0 && active) {
      const int64_t chunks = gridDim.y;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        acc_t total = 0;
        for (int r = 0; r < kRows; ++r) total += rows_sum[r][col * kVec + j];
        partial[(sample * chunks + chunk) * channels + c + j] = total;
      }
    }
  }
}

template <typename scalar_t, int kVec, bool kGate, bool kCache, typename index_t>
void launch_forward_as(const scalar_t* x, const scalar_t* y,
                       const typename AccType<scalar_t>::type* gate, scalar_t* out,
                       scalar_t* cache, int64_t numel, int64_t per_sample, int64_t channels) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  residual_forward_kernel<scalar_t, kVec, kGate, kCache, index_t>
      <<<grid_for(numel / kVec), kThreads, 0, stream>>>(
          x, y, gate, out, cache, static_cast<index_t>(numel), static_cast<index_t>(per_sample),
          static_cast<index_t>(channels));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int kVec>
void launch_forward(const scalar_t* x, const scalar_t* y,
                    const typename AccType<scalar_t>::type* gate, scalar_t* out, scalar_t* cache,
                    int64_t numel, int64_t per_sample, int64_t channels) {
  // 32-bit indices leave room for the grid stride past the last pack.
  const bool small = numel < (int64_t{1} << 31);
  with_flags([&](auto kGate_, auto kCache_) {
    constexpr bool kGate = decltype(kGate_)::value;
    constexpr bool kCache = decltype(kCache_)::value;
    if (small)
      launch_forward_as<scalar_t, kVec, kGate, kCache, uint32_t>(x, y, gate, out, cache, numel,
                                                                 per_sample, channels);
    else
      launch_forward_as<scalar_t, kVec, kGate, kCache, uint64_t>(x, y, gate, out, cache, numel,
                                                                 per_sample, channels);
  }, gate != nullptr, cache != nullptr);
}

at::Tensor gated_residual_forward(const at::Tensor& x, const at::Tensor& y,
                                  const std::optional<at::Tensor>& gate,
                                  const std::optional<at::Tensor>& cache_out) {
  check_gated_residual_forward(x, y, gate, cache_out);
  const bool has_gate = has(gate), has_cache = has(cache_out);
  c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor out = at::empty_like(x);
  const int64_t numel = x.numel();
  if (numel == 0) return out;
  const int64_t channels = has_gate ? x.size(-1) : numel;
  const int64_t per_sample = has_gate ? numel / x.size(0) : numel;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "gated_residual_forward_cuda", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const acc_t* gp = has_gate ? gate->const_data_ptr<acc_t>() : nullptr;
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    scalar_t* cp = has_cache ? cache_out->mutable_data_ptr<scalar_t>() : nullptr;
    constexpr int kMaxVec = 16 / sizeof(scalar_t);
    // A pack must not straddle two rows (gate) or run past the end (no gate).
    if (vector_width<scalar_t>({xp, yp, op, cp}, channels) == kMaxVec)
      launch_forward<scalar_t, kMaxVec>(xp, yp, gp, op, cp, numel, per_sample, channels);
    else
      launch_forward<scalar_t, 1>(xp, yp, gp, op, cp, numel, per_sample, channels);
  });
  return out;
}

template <typename scalar_t, int kVec, bool kY, bool kGate>
void launch_backward(const at::Tensor& grad, const at::Tensor& y, const at::Tensor& gate,
                     at::Tensor& d_y, at::Tensor& d_gate) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t samples = y.size(0), channels = y.size(-1);
  const int64_t tokens = y.numel() / (samples * channels);
  TORCH_CHECK(samples <= 65535, "gated_residual: the cuda backend supports at most 65535 samples");
  constexpr int64_t kMaxGridY = 65535;
  // The chunking depends on the shape only: the gate gradient is reproducible.
  const int64_t chunk_tokens = std::max(kChunkTokens, (tokens + kMaxGridY - 1) / kMaxGridY);
  const int64_t chunks = (tokens + chunk_tokens - 1) / chunk_tokens;
  const int64_t tiles = (channels + kCols * kVec - 1) / (kCols * kVec);
  at::Tensor partial =
      kGate ? at::empty({samples, chunks, channels}, gate.options()) : at::Tensor();
  auto stream = c10::cuda::getCurrentCUDAStream();
  residual_backward_kernel<scalar_t, kVec, kY, kGate>
      <<<dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(chunks),
              static_cast<unsigned>(samples)),
         kThreads, 0, stream>>>(grad.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
                                gate.const_data_ptr<acc_t>(),
                                kY ? d_y.mutable_data_ptr<scalar_t>() : nullptr,
                                kGate ? partial.mutable_data_ptr<acc_t>() : nullptr, tokens,
                                channels, chunk_tokens);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // A plain (atomic-free) sum over a fixed number of partials: deterministic.
  if (kGate) at::sum_out(d_gate, partial, 1);
}

template <typename scalar_t, int kVec>
void dispatch_backward(bool need_y, bool need_gate, const at::Tensor& grad, const at::Tensor& y,
                       const at::Tensor& gate, at::Tensor& d_y, at::Tensor& d_gate) {
  with_flags([&](auto kY_, auto kGate_) {
    constexpr bool kY = decltype(kY_)::value;
    constexpr bool kGate = decltype(kGate_)::value;
    launch_backward<scalar_t, kVec, kY, kGate>(grad, y, gate, d_y, d_gate);
  }, need_y, need_gate);
}

std::tuple<at::Tensor, at::Tensor> gated_residual_backward(const at::Tensor& grad,
                                                           const at::Tensor& y,
                                                           const std::optional<at::Tensor>& gate,
                                                           bool need_y, bool need_gate) {
  at::Tensor d_y, d_gate;
  std::tie(d_y, d_gate) = gated_residual_grads(grad, y, gate, need_y, need_gate);
  if (!has(gate) || y.numel() == 0 || !(need_y || need_gate)) return {d_y, d_gate};
  c10::cuda::CUDAGuard device_guard(y.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(),
                                  "gated_residual_backward_cuda", [&] {
    constexpr int kMaxVec = 16 / sizeof(scalar_t);
    const int vec = vector_width<scalar_t>(
        {grad.const_data_ptr(), y.const_data_ptr(), need_y ? d_y.const_data_ptr() : nullptr},
        y.size(-1));
    if (vec == kMaxVec)
      dispatch_backward<scalar_t, kMaxVec>(need_y, need_gate, grad, y, *gate, d_y, d_gate);
    else
      dispatch_backward<scalar_t, 1>(need_y, need_gate, grad, y, *gate, d_y, d_gate);
  });
  return {d_y, d_gate};
}

}  // namespace

TORCH_LIBRARY_IMPL(shortcut_kernels_ext, CUDA, m) {
  m.impl("gated_residual_forward", &gated_residual_forward);
  m.impl("gated_residual_backward", &gated_residual_backward);
}

}  // namespace cuda
}  // namespace shortcut_kernels
