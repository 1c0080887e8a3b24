// Helpers shared by the CUDA kernels: 16-byte vector access, launch sizing and a
// deterministic block reduction. The per-element math comes from shortcut_math.h.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../bool_dispatch.h"
#include "../checks.h"
#include "../grad_outputs.h"
#include "../shortcut_math.h"

namespace shortcut_kernels {
namespace cuda {

template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

template <typename scalar_t>
__device__ __forceinline__ typename AccType<scalar_t>::type to_acc(scalar_t v) {
  return static_cast<typename AccType<scalar_t>::type>(v);
}
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ scalar_t from_acc(acc_t v) {
  return static_cast<scalar_t>(v);
}

// kVec elements moved as one 16-byte (or smaller) transaction.
template <typename scalar_t, int kVec>
struct alignas(sizeof(scalar_t) * kVec) Pack {
  scalar_t v[kVec];
};

template <typename scalar_t, int kVec>
__device__ __forceinline__ Pack<scalar_t, kVec> load_pack(const scalar_t* p) {
  return *reinterpret_cast<const Pack<scalar_t, kVec>*>(p);
}
template <typename scalar_t, int kVec>
__device__ __forceinline__ void store_pack(scalar_t* p, const Pack<scalar_t, kVec>& pack) {
  *reinterpret_cast<Pack<scalar_t, kVec>*>(p) = pack;
}

constexpr int kThreads = 256;

// Elements per 16-byte vector when every pointer is aligned and `granule` (e.g. the
// per-sample size) is a multiple of it; 1 otherwise.
template <typename scalar_t>
inline int vector_width(std::initializer_list<const void*> ptrs, int64_t granule) {
  constexpr int kMax = 16 / sizeof(scalar_t);
  for (const void* p : ptrs)
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return 1;
  return granule % kMax == 0 ? kMax : 1;
}

inline int multiprocessor_count() {
  int device = 0, count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

// Grid for a grid-stride loop over `work` items: enough blocks to fill the GPU a few
// times over, no more (they would only add scheduling).
inline dim3 grid_for(int64_t work) {
  static thread_local int sms = multiprocessor_count();
  int64_t blocks = (work + kThreads - 1) / kThreads;
  int64_t cap = static_cast<int64_t>(sms) * 8;
  return dim3(static_cast<unsigned>(std::max<int64_t>(1, std::min(blocks, cap))));
}

// Sum of one value per thread over a block of kThreads, in a fixed order.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t value) {
  __shared__ acc_t warp_sums[kThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2)
    value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  acc_t total = 0;
  if (threadIdx.x == 0)
    for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
  return total;  // valid in thread 0 only
}

}  // namespace cuda
}  // namespace shortcut_kernels
