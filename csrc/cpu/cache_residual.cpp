// cache_residual on the CPU: out = x + caches[0] + ... + caches[K-1], the residual of a
// pruned block (or a run of consecutive pruned blocks) at inference, or with weights
// out = x + w[0]*caches[0] + ... + w[K-1]*caches[K-1] (a forecast). Every element is
// summed in the accumulation type and rounded once; each input is read once. The weights
// are read into acc_t values once, before the loops; unweighted calls run the plain sum.
// Schemas of the extension's ops live with their CPU kernels (always compiled).
#include <torch/library.h>

#include "cpu_common.h"

namespace shortcut_kernels {
namespace cpu {
namespace {

// Up to 4 caches: one streaming loop, every input read once per element.
// More caches: kSumBlock elements are summed in a stack buffer at a time; the buffer
// stays in L1 while the caches stream through it, and each loop over it vectorises.
constexpr int64_t kSumBlock = 1024;

// acc + w*cache when weighted, acc + cache (the unweighted op, bit for bit) otherwise.
template <bool kWeighted, typename acc_t>
SK_INLINE acc_t fold(acc_t acc, acc_t cache, acc_t w) {
  if constexpr (kWeighted)
    return shortcut_math::cache_residual_fma(acc, cache, w);
  else
    return shortcut_math::cache_residual_add(acc, cache);
}

template <typename scalar_t, typename out_t, int kCaches, bool kWeighted>
SK_CPU_CLONES void cache_residual_stream(const scalar_t* __restrict__ x,
                                         const scalar_t* __restrict__ c0,
                                         const scalar_t* __restrict__ c1,
                                         const scalar_t* __restrict__ c2,
                                         const scalar_t* __restrict__ c3,
                                         std::array<typename Io<scalar_t>::acc_t, 4> w,
                                         out_t* __restrict__ out, int64_t n) {
  using IO = Io<scalar_t>;
  for (int64_t i = 0; i < n; ++i) {
    auto acc = fold<kWeighted>(IO::load(x + i), IO::load(c0 + i), w[0]);
    if (kCaches > 1) acc = fold<kWeighted>(acc, IO::load(c1 + i), w[1]);
    if (kCaches > 2) acc = fold<kWeighted>(acc, IO::load(c2 + i), w[2]);
    if (kCaches > 3) acc = fold<kWeighted>(acc, IO::load(c3 + i), w[3]);
    Io<out_t>::store(out + i, acc);
  }
}

// weights: nullptr (unweighted) or one acc_t per cache.
template <typename scalar_t>
SK_CPU_CLONES void cache_residual_blocked(const scalar_t* __restrict__ x,
                                          const scalar_t* const* caches, int64_t num_caches,
                                          const typename Io<scalar_t>::acc_t* weights,
                                          scalar_t* __restrict__ out, int64_t begin,
                                          int64_t end, bool stream) {
  using IO = Io<scalar_t>;
  using acc_t = typename IO::acc_t;
  acc_t acc[kSumBlock];
  for (int64_t lo = begin; lo < end; lo += kSumBlock) {
    const int64_t n = std::min(kSumBlock, end - lo);
    for (int64_t i = 0; i < n; ++i) acc[i] = IO::load(x + lo + i);
    for (int64_t k = 0; k < num_caches; ++k) {
      const scalar_t* __restrict__ c = caches[k] + lo;
      if (weights) {
        const acc_t w = weights[k];
        for (int64_t i = 0; i < n; ++i)
          acc[i] = shortcut_math::cache_residual_fma(acc[i], IO::load(c + i), w);
      } else {
        for (int64_t i = 0; i < n; ++i) acc[i] = shortcut_math::cache_residual_add(acc[i], IO::load(c + i));
      }
    }
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, float>)
      store_tile(out + lo, acc, n, stream);  // see `tiled` in cpu_common.h
    else
      for (int64_t i = 0; i < n; ++i) IO::store(out + lo + i, acc[i]);
  }
  end_streaming(stream);
}

template <typename scalar_t, bool kWeighted>
void cache_residual_streamed(const scalar_t* x, const std::vector<const scalar_t*>& caches,
                             const std::vector<typename Io<scalar_t>::acc_t>& weights,
                             scalar_t* out, int64_t begin, int64_t end, bool stream) {
  using acc_t = typename Io<scalar_t>::acc_t;
  std::array<acc_t, 4> w{acc_t(1), acc_t(1), acc_t(1), acc_t(1)};  // unread when unweighted
  if constexpr (kWeighted)
    for (size_t k = 0; k < caches.size(); ++k) w[k] = weights[k];
  tiled<scalar_t>(end - begin, stream, [&]<typename out_t>(int64_t off, int64_t n, out_t* o) {
    const int64_t lo = begin + off;
    auto at = [&](size_t k) { return caches[std::min(k, caches.size() - 1)] + lo; };
    switch (caches.size()) {
      case 1:
        return cache_residual_stream<scalar_t, out_t, 1, kWeighted>(x + lo, at(0), at(0), at(0), at(0), w, o, n);
      case 2:
        return cache_residual_stream<scalar_t, out_t, 2, kWeighted>(x + lo, at(0), at(1), at(1), at(1), w, o, n);
      case 3:
        return cache_residual_stream<scalar_t, out_t, 3, kWeighted>(x + lo, at(0), at(1), at(2), at(2), w, o, n);
      default:
        return cache_residual_stream<scalar_t, out_t, 4, kWeighted>(x + lo, at(0), at(1), at(2), at(3), w, o, n);
    }
  }, out + begin);
}

// weights: empty (unweighted) or one acc_t per cache.
template <typename scalar_t>
void cache_residual_segment(const scalar_t* x, const std::vector<const scalar_t*>& caches,
                            const std::vector<typename Io<scalar_t>::acc_t>& weights,
                            scalar_t* out, int64_t begin, int64_t end, bool stream) {
  if (caches.size() > 4)
    return cache_residual_blocked<scalar_t>(x, caches.data(), static_cast<int64_t>(caches.size()),
                                            weights.empty() ? nullptr : weights.data(), out, begin,
                                            end, stream);
  if (weights.empty())
    return cache_residual_streamed<scalar_t, false>(x, caches, weights, out, begin, end, stream);
  return cache_residual_streamed<scalar_t, true>(x, caches, weights, out, begin, end, stream);
}

at::Tensor cache_residual_forward(const at::Tensor& x, at::TensorList caches,
                                  const std::optional<at::Tensor>& weights) {
  const bool weighted = check_cache_residual_inputs(x, caches, weights);
  at::Tensor out = at::empty_like(x);
  const int64_t numel = x.numel();
  if (numel == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "cache_residual_forward_cpu", [&] {
    std::vector<const scalar_t*> ptrs;
    ptrs.reserve(caches.size());
    for (const auto& c : caches) ptrs.push_back(c.const_data_ptr<scalar_t>());
    using acc_t = typename Io<scalar_t>::acc_t;
    std::vector<acc_t> w;  // read once here (a CPU tensor), before the loops
    if (weighted) {
      const acc_t* wp = weights->const_data_ptr<acc_t>();
      w.assign(wp, wp + caches.size());
    }
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const bool stream = stream_outputs(x.nbytes() * static_cast<int64_t>(caches.size() + 2));
    at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
      cache_residual_segment<scalar_t>(xp, ptrs, w, op, begin, end, stream);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(shortcut_kernels_ext, m) {
  m.def("cache_residual_forward(Tensor x, Tensor[] caches, Tensor? weights=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(shortcut_kernels_ext, CPU, m) {
  m.impl("cache_residual_forward", &cache_residual_forward);
}

}  // namespace cpu
}  // namespace shortcut_kernels
