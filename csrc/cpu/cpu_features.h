// Which hand-written x86 paths the CPU kernels may take, decided once per process.
// Kept apart from cpu_common.h so that module.cpp can report them (`_C.cpu_info()`).
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string_view>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#include <immintrin.h>
#define SK_X86_INTRINSICS 1
#else
#define SK_X86_INTRINSICS 0
#endif

namespace shortcut_kernels {
namespace cpu {

static inline bool env_is(const char* name, std::string_view value) {
  const char* set = std::getenv(name);
  return set != nullptr && std::string_view(set) == value;
}

// The hand-written AVX-512 paths (bf16 rounding, streaming stores) run only where the CPU
// has the instructions: without AVX-512F they would die of SIGILL. The per-ISA clones
// (SK_CPU_CLONES) need no check: the loader picks them. SHORTCUT_KERNELS_CPU_NO_AVX512=1
// makes the check report no AVX-512 at all (tests: the generic paths on any CPU).
static inline bool has_avx512f() {
#if SK_X86_INTRINSICS
  static const bool has =
      __builtin_cpu_supports("avx512f") && !env_is("SHORTCUT_KERNELS_CPU_NO_AVX512", "1");
  return has;
#else
  return false;
#endif
}

// SHORTCUT_KERNELS_CPU_BF16=generic forces the generic rounding: the tests compare the
// two paths on machines that have the instruction.
static inline bool use_avx512bf16() {
#if SK_X86_INTRINSICS
  static const bool use = has_avx512f() && __builtin_cpu_supports("avx512bf16") &&
                          !env_is("SHORTCUT_KERNELS_CPU_BF16", "generic");
  return use;
#else
  return false;
#endif
}

// ---- streaming stores for outputs larger than the cache -----------------------------
// When an op's data does not fit in the last-level cache, its outputs are written with
// non-temporal stores: they skip the read of each output line before it is written and
// leave the inputs in the cache (15-20% faster at DiT sizes in bf16 on the bench machine).
// When the data fits they would send the output to DRAM for nothing (1.6x slower), hence
// the threshold: the bytes an op reads and writes, against the L3 of one cache instance
// (sysfs; 32 MB if unknown). SHORTCUT_KERNELS_STREAM_MIN_BYTES overrides it (tests).
static inline int64_t last_level_cache_bytes() {
  int64_t bytes = 32ll << 20;
  if (FILE* f = std::fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r")) {
    long long value = 0;
    char unit = 0;
    if (std::fscanf(f, "%lld%c", &value, &unit) >= 1 && value > 0)
      bytes = value << (unit == 'K' ? 10 : unit == 'M' ? 20 : 0);
    std::fclose(f);
  }
  return bytes;
}

// Op calls whose outputs were streamed, for `_C.cpu_info()` (tests check which path ran).
inline std::atomic<int64_t>& streamed_calls() {
  static std::atomic<int64_t> count{0};
  return count;
}

// The size from which an op streams its outputs: never without AVX-512F.
static inline int64_t stream_min_bytes() {
  static const int64_t threshold = [] {
    if (!has_avx512f()) return std::numeric_limits<int64_t>::max();
    const char* set = std::getenv("SHORTCUT_KERNELS_STREAM_MIN_BYTES");
    return set != nullptr ? static_cast<int64_t>(std::atoll(set)) : last_level_cache_bytes();
  }();
  return threshold;
}

}  // namespace cpu
}  // namespace shortcut_kernels
