// cache_residual on CUDA: out = x + caches[0] + ... + caches[K-1], or with weights
// out = x + w[0]*caches[0] + ... + w[K-1]*caches[K-1]. Up to kMaxCaches cache pointers
// travel by value with one launch; more caches fold in further passes through an
// accumulation-type buffer, so every element is still rounded to storage only once. The
// weights stay on the device (no host sync): each thread loads its launch's ones once.
#include <torch/library.h>

#include <string>
#include <vector>

#include "cuda_common.cuh"

namespace shortcut_kernels {
namespace cuda {
namespace {

constexpr int kMaxCaches = 8;

template <typename scalar_t>
struct CachePtrs {
  const scalar_t* ptr[kMaxCaches];
};

// out = base + sum of `count` caches (each times its weight when kWeighted: `weights`
// holds this launch's `count` acc_t weights, on the device), elementwise in packs of kVec.
// base_t/out_t are the storage type or the accumulation type (first, middle and last
// pass of a long sum); a middle pass reads and writes the same buffer, hence no
// __restrict__ on base/out.
template <typename scalar_t, typename base_t, typename out_t, int kVec, bool kWeighted>
__global__ void __launch_bounds__(kThreads)
    cache_residual_kernel(const base_t* base, CachePtrs<scalar_t> caches,
                          const typename AccType<scalar_t>::type* __restrict__ weights,
                          int count, out_t* out, int64_t numel) {
  using acc_t = typename AccType<scalar_t>::type;
  acc_t w[kMaxCaches];
  if constexpr (kWeighted) {
#pragma unroll
    for (int k = 0; k < kMaxCaches; ++k) w[k] = k < count ? weights[k] : acc_t(0);
  }
  const int64_t num_packs = numel / kVec;
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < num_packs;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t off = p * kVec;
    auto b = load_pack<base_t, kVec>(base + off);
    acc_t acc[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) acc[j] = static_cast<acc_t>(b.v[j]);
#pragma unroll
    for (int k = 0; k < kMaxCaches; ++k) {
      if (k < count) {
        auto c = load_pack<scalar_t, kVec>(caches.ptr[k] + off);
        if constexpr (kWeighted) {
#pragma unroll
          for (int j = 0; j < kVec; ++j)
            acc[j] = shortcut_math::cache_residual_fma(acc[j], to_acc(c.v[j]), w[k]);
        } else {
#pragma unroll
          for (int j = 0; j < kVec; ++j)
            acc[j] = shortcut_math::cache_residual_add(acc[j], to_acc(c.v[j]));
        }
      }
    }
    Pack<out_t, kVec> o;
#pragma unroll
    for (int j = 0; j < kVec; ++j) o.v[j] = static_cast<out_t>(acc[j]);
    store_pack<out_t, kVec>(out + off, o);
  }
}

// weights: nullptr (unweighted) or one acc_t per cache on the device.
template <typename scalar_t, int kVec, bool kWeighted>
void launch_all(const at::Tensor& x, at::TensorList caches,
                const typename AccType<scalar_t>::type* weights, at::Tensor& out) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t numel = x.numel();
  const int64_t n = static_cast<int64_t>(caches.size());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid = grid_for(numel / kVec);
  auto group = [&](int64_t first) {
    CachePtrs<scalar_t> ptrs{};
    const int count = static_cast<int>(std::min<int64_t>(kMaxCaches, n - first));
    for (int k = 0; k < count; ++k) ptrs.ptr[k] = caches[first + k].const_data_ptr<scalar_t>();
    return std::make_pair(ptrs, count);
  };
  auto weights_of = [&](int64_t first) { return kWeighted ? weights + first : nullptr; };
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  if (n <= kMaxCaches) {
    auto [ptrs, count] = group(0);
    cache_residual_kernel<scalar_t, scalar_t, scalar_t, kVec, kWeighted>
        <<<grid, kThreads, 0, stream>>>(xp, ptrs, weights_of(0), count, op, numel);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  // Running sum in the accumulation type: `out` itself for fp32/fp64, a buffer otherwise.
  at::Tensor buffer;
  acc_t* acc;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    acc = op;
  } else {
    buffer = at::empty({numel}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    acc = buffer.mutable_data_ptr<acc_t>();
  }
  {
    auto [ptrs, count] = group(0);
    cache_residual_kernel<scalar_t, scalar_t, acc_t, kVec, kWeighted>
        <<<grid, kThreads, 0, stream>>>(xp, ptrs, weights_of(0), count, acc, numel);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  for (int64_t first = kMaxCaches; first < n; first += kMaxCaches) {
    auto [ptrs, count] = group(first);
    if (first + kMaxCaches >= n)  // last pass: round to storage once
      cache_residual_kernel<scalar_t, acc_t, scalar_t, kVec, kWeighted>
          <<<grid, kThreads, 0, stream>>>(acc, ptrs, weights_of(first), count, op, numel);
    else
      cache_residual_kernel<scalar_t, acc_t, acc_t, kVec, kWeighted>
          <<<grid, kThreads, 0, stream>>>(acc, ptrs, weights_of(first), count, acc, numel);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename scalar_t, int kVec>
void launch_any(const at::Tensor& x, at::TensorList caches, const std::optional<at::Tensor>& weights,
                at::Tensor& out) {
  using acc_t = typename AccType<scalar_t>::type;
  if (has(weights))
    launch_all<scalar_t, kVec, true>(x, caches, weights->const_data_ptr<acc_t>(), out);
  else
    launch_all<scalar_t, kVec, false>(x, caches, nullptr, out);
}

at::Tensor cache_residual_forward(const at::Tensor& x, at::TensorList caches,
                                  const std::optional<at::Tensor>& weights) {
  check_cache_residual_inputs(x, caches, weights);
  c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor out = at::empty_like(x);
  const int64_t numel = x.numel();
  if (numel == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "cache_residual_forward_cuda", [&] {
    constexpr int kMaxVec = 16 / sizeof(scalar_t);
    bool aligned = vector_width<scalar_t>({x.const_data_ptr(), out.const_data_ptr()}, numel) ==
                   kMaxVec;
    for (const auto& c : caches)
      aligned = aligned && vector_width<scalar_t>({c.const_data_ptr()}, numel) == kMaxVec;
    if (aligned)
      launch_any<scalar_t, kMaxVec>(x, caches, weights, out);
    else
      launch_any<scalar_t, 1>(x, caches, weights, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(shortcut_kernels_ext, CUDA, m) {
  m.impl("cache_residual_forward", &cache_residual_forward);
}

}  // namespace cuda
}  // namespace shortcut_kernels
