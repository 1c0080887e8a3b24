// Runtime flags -> template arguments, for the CPU and CUDA kernels alike.
//
//   with_flags([&]<bool kFresh, bool kCache>() { run<scalar_t, kFresh, kCache>(...); },
//              need_fresh, need_cache);
//
// calls the template lambda instantiated for the values of the flags. The kernels take
// "which outputs / inputs are present" as template arguments, so that an absent one
// costs neither loads nor stores nor branches in the hot loop.
#pragma once

#include <utility>

namespace shortcut_kernels {

template <bool... Known, typename Fn>
decltype(auto) with_flags(Fn&& fn) {
  return std::forward<Fn>(fn).template operator()<Known...>();
}

template <bool... Known, typename Fn, typename... Rest>
decltype(auto) with_flags(Fn&& fn, bool first, Rest... rest) {
  if (first) return with_flags<Known..., true>(std::forward<Fn>(fn), rest...);
  return with_flags<Known..., false>(std::forward<Fn>(fn), rest...);
}

}  // namespace shortcut_kernels
