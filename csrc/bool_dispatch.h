// Runtime flags -> template arguments, for the CPU and CUDA kernels alike.
//
//   with_flags([&](auto kFresh_, auto kCache_) {
//     constexpr bool kFresh = decltype(kFresh_)::value;
//     constexpr bool kCache = decltype(kCache_)::value;
//     run<scalar_t, kFresh, kCache>(...);
//   }, need_fresh, need_cache);
//
// calls the generic lambda with one std::integral_constant<bool, flag> per flag. (C++17: template
// lambdas are C++20, and torch 2.11 builds with -std=c++17.) The kernels take "which outputs /
// inputs are present" as template arguments, so that an absent one costs neither loads nor
// stores nor branches in the hot loop.
#pragma once

#include <type_traits>
#include <utility>

namespace shortcut_kernels {

template <bool... Known, typename Fn>
decltype(auto) with_flags(Fn&& fn) {
  return std::forward<Fn>(fn)(std::integral_constant<bool, Known>{}...);
}

template <bool... Known, typename Fn, typename... Rest>
decltype(auto) with_flags(Fn&& fn, bool first, Rest... rest) {
  if (first) return with_flags<Known..., true>(std::forward<Fn>(fn), rest...);
  return with_flags<Known..., false>(std::forward<Fn>(fn), rest...);
}

}  // namespace shortcut_kernels
