// Helpers shared by the CPU kernels: storage <-> accumulation conversion, per-ISA
// function clones, argument checks and deterministic chunking.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string_view>
#include <type_traits>
#include <vector>

#include "cpu_features.h"  // SK_X86_INTRINSICS, has_avx512f(), stream_min_bytes()
#include "../bool_dispatch.h"
#include "../checks.h"
#include "../grad_outputs.h"
#include "../shortcut_math.h"

// Hot loops are compiled once per x86 ISA level and picked at load time (GCC ifunc),
// so one wheel runs everywhere and still uses AVX-512/AVX2 where the CPU has them.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SK_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SK_CPU_CLONES
#endif
#define SK_INLINE inline __attribute__((always_inline))

namespace shortcut_kernels {
namespace cpu {

// Io<scalar_t>: load one stored element as acc_t, store acc_t rounded to storage.
// Written with plain integer ops so the compiler vectorises whole loops around them.
template <typename scalar_t>
struct Io;

template <>
struct Io<float> {
  using acc_t = float;
  static SK_INLINE float load(const float* p) { return *p; }
  static SK_INLINE void store(float* p, float v) { *p = v; }
};

template <>
struct Io<double> {
  using acc_t = double;
  static SK_INLINE double load(const double* p) { return *p; }
  static SK_INLINE void store(double* p, double v) { *p = v; }
};

template <>
struct Io<c10::BFloat16> {
  using acc_t = float;
  static SK_INLINE float load(const c10::BFloat16* p) {
    uint32_t bits = static_cast<uint32_t>(p->x) << 16;
    float out;
    std::memcpy(&out, &bits, sizeof(out));
    return out;
  }
  // Round to nearest even, NaN stays a quiet NaN (same as c10::BFloat16).
  static SK_INLINE void store(c10::BFloat16* p, float v) {
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof(bits));
    uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    bool is_nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
    p->x = static_cast<uint16_t>(is_nan ? 0x7FC0u : rounded);
  }
};

template <>
struct Io<c10::Half> {
  using acc_t = float;
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
  // GCC's _Float16 becomes vcvtph2ps/vcvtps2ph in the AVX2/AVX-512 clones.
  static SK_INLINE float load(const c10::Half* p) {
    _Float16 h;
    std::memcpy(&h, p, sizeof(h));
    return static_cast<float>(h);
  }
  static SK_INLINE void store(c10::Half* p, float v) {
    _Float16 h = static_cast<_Float16>(v);
    std::memcpy(p, &h, sizeof(h));
  }
#else
  static SK_INLINE float load(const c10::Half* p) { return static_cast<float>(*p); }
  static SK_INLINE void store(c10::Half* p, float v) { *p = c10::Half(v); }
#endif
};

// ---- bf16 outputs through fp32 tiles ------------------------------------------------
// Rounding fp32 to bf16 with integer ops (Io<BFloat16>::store) costs ~10 vector
// instructions per 8 values: enough to make the bf16 kernels compute-bound, slower than
// the fp32 ones that move twice the bytes. CPUs with AVX512_BF16 (Zen 4, Sapphire Rapids
// and later) round 32 values in one instruction, reachable through intrinsics only. So
// a kernel loop writes its bf16 results as fp32 into a tile that stays in L1, and
// store_bf16 rounds and stores the tile in one pass (see `tiled` below).
constexpr int64_t kTile = 1024;

// The generic rounding, also the tail and the path of CPUs without AVX512_BF16.
static SK_CPU_CLONES void store_bf16_generic(c10::BFloat16* __restrict__ dst,
                                             const float* __restrict__ src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) Io<c10::BFloat16>::store(dst + i, src[i]);
}

#if SK_X86_INTRINSICS
// VCVTNEPS2BF16 rounds to nearest even like c10::BFloat16 and keeps NaNs NaN; unlike it,
// it flushes fp32 denormals (below 2^-126) to zero and keeps the sign and payload of a NaN.
// `stream`: non-temporal stores for the 32-byte aligned part (see stream_outputs).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) static void store_bf16_avx512(
    c10::BFloat16* dst, const float* src, int64_t n, bool stream) {
  int64_t i = 0;
  if (stream) {
    const int64_t head = ((32 - reinterpret_cast<uintptr_t>(dst) % 32) % 32) / 2;
    if (reinterpret_cast<uintptr_t>(dst) % 2 == 0 && head + 16 <= n) {
      store_bf16_generic(dst, src, head);
      for (i = head; i + 16 <= n; i += 16) {
        const __m256bh packed = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + i));
        _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i),
                            reinterpret_cast<const __m256i&>(packed));
      }
    }
  }
  for (; i + 16 <= n; i += 16) {
    const __m256bh packed = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + i));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), reinterpret_cast<const __m256i&>(packed));
  }
  if (i < n) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (n - i)) - 1u);
    const __m256bh packed = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, src + i));
    _mm256_mask_storeu_epi16(dst + i, mask, reinterpret_cast<const __m256i&>(packed));
  }
}

// fp32 tile -> memory with non-temporal stores for the 64-byte aligned part.
__attribute__((target("avx512f"))) static void store_f32_stream_avx512(float* dst,
                                                                       const float* src,
                                                                       int64_t n) {
  int64_t i = 0;
  const int64_t head = ((64 - reinterpret_cast<uintptr_t>(dst) % 64) % 64) / 4;
  if (reinterpret_cast<uintptr_t>(dst) % 4 == 0 && head + 16 <= n) {
    std::memcpy(dst, src, head * sizeof(float));
    for (i = head; i + 16 <= n; i += 16) _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
  }
  std::memcpy(dst + i, src + i, (n - i) * sizeof(float));
}
#endif

static inline void store_bf16(c10::BFloat16* dst, const float* src, int64_t n, bool stream) {
#if SK_X86_INTRINSICS
  if (use_avx512bf16()) return store_bf16_avx512(dst, src, n, stream);
#endif
  store_bf16_generic(dst, src, n);
}

static inline bool stream_outputs(int64_t total_bytes) {
  const bool stream = total_bytes >= stream_min_bytes();
  if (stream) streamed_calls().fetch_add(1, std::memory_order_relaxed);
  return stream;
}

// Non-temporal stores are weakly ordered: a thread that streamed fences once when done
// (not after every tile: that would wait for each tile to reach memory).
static inline void end_streaming(bool stream) {
#if SK_X86_INTRINSICS
  if (stream) _mm_sfence();
#else
  (void)stream;
#endif
}

// Stores an fp32 tile as bf16 or fp32, with streaming stores when asked (and possible);
// end_streaming() after the last one.
template <typename scalar_t>
static inline void store_tile(scalar_t* dst, const float* src, int64_t n, bool stream) {
  static_assert(std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, float>);
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    store_bf16(dst, src, n, stream);
  } else {
#if SK_X86_INTRINSICS
    if (stream) return store_f32_stream_avx512(dst, src, n);
#endif
    std::memcpy(dst, src, n * sizeof(float));
  }
}

// Runs a kernel loop over [0, n) whose outputs are `outs` (null: not written):
//   loop.template operator()<out_t>(offset, count, out_t* out0, ...)
// covers [offset, offset + count) of the inputs and writes element i of that range at
// out_k[i]. With bf16 outputs, or fp32 ones to be streamed (`stream`, from
// stream_outputs), it runs tile by tile with fp32 tiles as outputs (out_t = float), then
// stores the tiles; otherwise once, on the outputs (out_t = scalar_t).
// Reductions keep their accumulators in the loop's captures across the calls.
template <typename scalar_t, typename Loop, typename... Out>
void tiled(int64_t n, bool stream, const Loop& loop, Out*... outs) {
  constexpr bool kBf16 = std::is_same_v<scalar_t, c10::BFloat16>;
  constexpr bool kFloat = std::is_same_v<scalar_t, float>;
#if SK_X86_INTRINSICS
  const bool through_tiles = kBf16 || (kFloat && stream);
#else
  const bool through_tiles = kBf16;
#endif
  if (!through_tiles) {
    loop.template operator()<scalar_t>(int64_t{0}, n, outs...);
    return;
  }
  if constexpr (kBf16 || kFloat) {
    constexpr size_t kOuts = sizeof...(Out);
    alignas(64) float tiles[kOuts][kTile];
    const std::array<scalar_t*, kOuts> dst{outs...};
    std::array<float*, kOuts> tile_ptrs{};
    for (size_t k = 0; k < kOuts; ++k) tile_ptrs[k] = dst[k] != nullptr ? tiles[k] : nullptr;
    for (int64_t lo = 0; lo < n; lo += kTile) {
      const int64_t count = std::min(kTile, n - lo);
      std::apply([&](auto*... tile) { loop.template operator()<float>(lo, count, tile...); },
                 tile_ptrs);
      for (size_t k = 0; k < kOuts; ++k)
        if (dst[k] != nullptr) store_tile(dst[k] + lo, tiles[k], count, stream);
    }
    end_streaming(stream);
  }
}

// Elements per parallel task: big enough to amortise scheduling, small enough to
// split a 2-4 MB tensor over a handful of threads.
constexpr int64_t kGrain = 32768;
// Fixed chunk of a per-sample reduction: partial sums depend on this constant only,
// never on the thread count, so gradients are bitwise reproducible.
constexpr int64_t kReduceChunk = 16384;
// Independent accumulators in reduction loops (vectorised across them).
constexpr int kLanes = 16;

// Runs fn(sample, begin, end) over [0, numel) in parallel; every [begin, end) lies
// inside one sample of `per_sample` elements.
template <typename Fn>
void for_each_sample_segment(int64_t numel, int64_t per_sample, const Fn& fn) {
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    while (i < end) {
      int64_t sample = i / per_sample;
      int64_t seg_end = std::min(end, (sample + 1) * per_sample);
      fn(sample, i, seg_end);
      i = seg_end;
    }
  });
}

// Runs fn(sample, begin, end) -> partial sum over fixed chunks of every sample and
// returns the per-sample sums, added in a fixed order (deterministic).
template <typename acc_t, typename Fn>
std::vector<double> per_sample_chunked_sum(int64_t num_samples, int64_t per_sample,
                                           const Fn& fn) {
  const int64_t chunks = std::max<int64_t>(1, (per_sample + kReduceChunk - 1) / kReduceChunk);
  std::vector<acc_t> partial(num_samples * chunks, acc_t(0));
  at::parallel_for(0, num_samples * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      int64_t sample = task / chunks, chunk = task % chunks;
      int64_t lo = sample * per_sample + chunk * kReduceChunk;
      int64_t hi = std::min(lo + kReduceChunk, (sample + 1) * per_sample);
      partial[task] = lo < hi ? fn(sample, lo, hi) : acc_t(0);
    }
  });
  std::vector<double> sums(num_samples, 0.0);
  for (int64_t s = 0; s < num_samples; ++s)
    for (int64_t c = 0; c < chunks; ++c) sums[s] += static_cast<double>(partial[s * chunks + c]);
  return sums;
}

}  // namespace cpu
}  // namespace shortcut_kernels
