// gated_residual on the CPU: out = x + gate*y (the adaLN-Zero residual of DiT blocks),
// x and y viewed as [B, T, C] (C innermost), gate [B, C] broadcast over the T tokens;
// optionally the delta gate*y is written into `cache_out` in the same pass.
// Schemas of the extension's ops live with their CPU kernels (always compiled).
#include <torch/library.h>

#include "cpu_common.h"

namespace shortcut_kernels {
namespace cpu {
namespace {

// Elements per task of the gate reduction: whole tokens, about this many elements.
// Depends on the shape only (never on the thread count): the sum is reproducible.
constexpr int64_t kTokenChunkElems = 65536;

// Elements [begin, begin + n) of the data viewed as [rows, channels]; row r belongs to
// sample r / tokens. Inputs are indexed from their start, outputs from `begin` (an fp32
// tile for bf16, see `tiled`). Without a gate the caller passes the whole tensor as one
// row. A range may start and end inside a row.
template <typename scalar_t, typename out_t, bool kGate, bool kCache>
SK_CPU_CLONES void residual_loop(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
                                 const typename Io<scalar_t>::acc_t* __restrict__ gate,
                                 out_t* __restrict__ out, out_t* __restrict__ cache,
                                 int64_t begin, int64_t n, int64_t tokens, int64_t channels) {
  using IO = Io<scalar_t>;
  using acc_t = typename IO::acc_t;
  for (int64_t i = 0; i < n;) {
    const int64_t e = begin + i, c0 = e % channels, len = std::min(channels - c0, n - i);
    const acc_t* __restrict__ g = kGate ? gate + (e / channels / tokens) * channels + c0 : nullptr;
    for (int64_t c = 0; c < len; ++c) {
      acc_t delta = IO::load(y + e + c);
      if (kGate) delta = shortcut_math::gated_residual_delta(delta, g[c]);
      if (kCache) Io<out_t>::store(cache + i + c, delta);
      Io<out_t>::store(out + i + c, shortcut_math::gated_residual(IO::load(x + e + c), delta));
    }
    i += len;
  }
}

// Elements [begin, begin + n) of one sample's [tokens, channels] rows: dy = gate*g and
// partial[c] += g*y, row after row (the order of the sums does not depend on the tiling).
template <typename scalar_t, typename out_t, bool kY, bool kGate>
SK_CPU_CLONES void residual_backward_loop(const scalar_t* __restrict__ grad,
                                          const scalar_t* __restrict__ y,
                                          const typename Io<scalar_t>::acc_t* __restrict__ gate,
                                          out_t* __restrict__ d_y,
                                          typename Io<scalar_t>::acc_t* __restrict__ partial,
                                          int64_t begin, int64_t n, int64_t channels) {
  using IO = Io<scalar_t>;
  using acc_t = typename IO::acc_t;
  for (int64_t i = 0; i < n;) {
    const int64_t e = begin + i, c0 = e % channels, len = std::min(channels - c0, n - i);
    for (int64_t c = 0; c < len; ++c) {
      acc_t g = IO::load(grad + e + c);
      if (kY) Io<out_t>::store(d_y + i + c, shortcut_math::gated_residual_grad_y(g, gate[c0 + c]));
      if (kGate)
        partial[c0 + c] += shortcut_math::gated_residual_grad_gate_term(g, IO::load(y + e + c));
    }
    i += len;
  }
}

template <typename scalar_t, bool kGate, bool kCache>
void run_forward(const at::Tensor& x, const at::Tensor& y, const std::optional<at::Tensor>& gate,
                 at::Tensor& out, const std::optional<at::Tensor>& cache_out, int64_t tokens,
                 int64_t channels) {
  using acc_t = typename Io<scalar_t>::acc_t;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* yp = y.const_data_ptr<scalar_t>();
  const acc_t* gp = kGate ? gate->const_data_ptr<acc_t>() : nullptr;
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  scalar_t* cp = kCache ? cache_out->mutable_data_ptr<scalar_t>() : nullptr;
  const bool stream = stream_outputs(x.nbytes() * (3 + kCache));
  at::parallel_for(0, x.numel(), kGrain, [&](int64_t begin, int64_t end) {
    tiled<scalar_t>(end - begin, stream, [&]<typename out_t>(int64_t off, int64_t count, out_t* o, out_t* c) {
      residual_loop<scalar_t, out_t, kGate, kCache>(xp, yp, gp, o, c, begin + off, count, tokens,
                                                    channels);
    }, op + begin, kCache ? cp + begin : nullptr);
  });
}

at::Tensor gated_residual_forward(const at::Tensor& x, const at::Tensor& y,
                                  const std::optional<at::Tensor>& gate,
                                  const std::optional<at::Tensor>& cache_out) {
  check_gated_residual_forward(x, y, gate, cache_out);
  const bool has_gate = has(gate), has_cache = has(cache_out);
  at::Tensor out = at::empty_like(x);
  const int64_t numel = x.numel();
  if (numel == 0) return out;
  // Without a gate the op is elementwise: the whole tensor is one "row".
  const int64_t channels = has_gate ? x.size(-1) : numel;
  const int64_t tokens = has_gate ? numel / channels / x.size(0) : 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "gated_residual_forward_cpu", [&] {
    with_flags([&](auto kGate_, auto kCache_) {
      constexpr bool kGate = decltype(kGate_)::value;
      constexpr bool kCache = decltype(kCache_)::value;
      run_forward<scalar_t, kGate, kCache>(x, y, gate, out, cache_out, tokens, channels);
    }, has_gate, has_cache);
  });
  return out;
}

template <typename scalar_t, bool kY, bool kGate>
void run_backward(const at::Tensor& grad, const at::Tensor& y, const at::Tensor& gate,
                  at::Tensor& d_y, at::Tensor& d_gate) {
  using acc_t = typename Io<scalar_t>::acc_t;
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  const scalar_t* yp = y.const_data_ptr<scalar_t>();
  scalar_t* dy = kY ? d_y.mutable_data_ptr<scalar_t>() : nullptr;
  const acc_t* gates = gate.const_data_ptr<acc_t>();
  const int64_t samples = y.size(0), channels = y.size(-1);
  const int64_t tokens = y.numel() / (samples * channels);
  const int64_t chunk = std::max<int64_t>(1, kTokenChunkElems / channels);  // tokens
  const int64_t chunks = (tokens + chunk - 1) / chunk;
  // partial[b, k, c]: sum of g*y over the tokens of chunk k of sample b.
  std::vector<acc_t> partial(kGate ? samples * chunks * channels : 0, acc_t(0));
  const bool stream = stream_outputs(y.nbytes() * (1 + kY + kGate));
  at::parallel_for(0, samples * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, k = task % chunks;
      const int64_t t0 = k * chunk, t1 = std::min(tokens, t0 + chunk);
      const int64_t off = (b * tokens + t0) * channels;
      acc_t* sums = kGate ? partial.data() + task * channels : nullptr;
      tiled<scalar_t>((t1 - t0) * channels, stream, [&]<typename out_t>(int64_t o, int64_t count, out_t* d) {
        residual_backward_loop<scalar_t, out_t, kY, kGate>(g + off, yp + off, gates + b * channels,
                                                           d, sums, o, count, channels);
      }, kY ? dy + off : nullptr);
    }
  });
  if (kGate) {
    acc_t* dg = d_gate.mutable_data_ptr<acc_t>();
    std::vector<double> sums(channels);
    for (int64_t b = 0; b < samples; ++b) {
      std::fill(sums.begin(), sums.end(), 0.0);
      for (int64_t k = 0; k < chunks; ++k) {
        const acc_t* row = partial.data() + (b * chunks + k) * channels;
        for (int64_t c = 0; c < channels; ++c) sums[c] += static_cast<double>(row[c]);
      }
      for (int64_t c = 0; c < channels; ++c) dg[b * channels + c] = static_cast<acc_t>(sums[c]);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> gated_residual_backward(const at::Tensor& grad,
                                                           const at::Tensor& y,
                                                           const std::optional<at::Tensor>& gate,
                                                           bool need_y, bool need_gate) {
  at::Tensor d_y, d_gate;
  std::tie(d_y, d_gate) = gated_residual_grads(grad, y, gate, need_y, need_gate);
  if (!has(gate) || y.numel() == 0 || !(need_y || need_gate)) return {d_y, d_gate};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(),
                                  "gated_residual_backward_cpu", [&] {
    with_flags([&](auto kY_, auto kGate_) {
      constexpr bool kY = decltype(kY_)::value;
      constexpr bool kGate = decltype(kGate_)::value;
      run_backward<scalar_t, kY, kGate>(grad, y, *gate, d_y, d_gate);
    }, need_y, need_gate);
  });
  return {d_y, d_gate};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(shortcut_kernels_ext, m) {
  m.def(
      "gated_residual_forward(Tensor x, Tensor y, Tensor? gate, Tensor(a!)? cache_out) "
      "-> Tensor");
  m.def(
      "gated_residual_backward(Tensor grad, Tensor y, Tensor? gate, bool need_y, "
      "bool need_gate) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(shortcut_kernels_ext, CPU, m) {
  m.impl("gated_residual_forward", &gated_residual_forward);
  m.impl("gated_residual_backward", &gated_residual_backward);
}

}  // namespace cpu
}  // namespace shortcut_kernels
