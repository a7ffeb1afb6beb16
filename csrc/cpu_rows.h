// Row loops of the CPU twins, written so the compiler vectorises them: restrict
// pointers, no branches, no libm calls, fp32 accumulation. With GCC on x86-64
// each is compiled for AVX2 + FMA (x86-64-v3) and for the baseline, the long row
// loops for AVX-512 (x86-64-v4) too, and the loader picks one per machine
// (target_clones). The kernels need
// -fno-trapping-math for the selects in their element math to vectorise.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "numeric.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MOEPP_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
// Long vertical row loops (SwiGLU, the combine's and gather's rows) get an AVX-512
// (x86-64-v4) clone too: 512-bit vectors halve their instructions (measured on Sapphire
// Rapids, one thread, 2048-wide rows: SwiGLU bf16 2.3 -> 1.1 ms per 1024 rows, fp32
// 1.3 -> 0.8). The router's short, branchy loops gained nothing from it and keep v3.
// Each lane's math is the same in every clone, but for rounding: the v3 and v4 clones fuse a
// product and a sum into one FMA (the build contracts them, -ffp-contract=fast under gnu++17)
// where the baseline clone rounds twice, so on a CPU without AVX2 results may differ in the
// last bits. The clone does not change between the calls of one process.
#define MOEPP_CPU_WIDE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MOEPP_CPU_CLONES
#define MOEPP_CPU_WIDE_CLONES
#endif

// A row loop inlined into a MOEPP_CPU_CLONES caller, so it is compiled for each of
// the caller's instruction sets (a call through the clones' dispatch cannot inline).
#if defined(__GNUC__)
#define MOEPP_ROW_INLINE inline __attribute__((always_inline))
#else
#define MOEPP_ROW_INLINE inline
#endif

namespace moepp::rows {

// dst = outer * (inner * src); with both factors 1 and one type, src copied as it is
// (1 * x is x; a NaN keeps its payload).
template <typename T, typename S>
MOEPP_CPU_WIDE_CLONES void scale(const S* __restrict src, float outer, float inner, int64_t n, T* __restrict dst) {
  if constexpr (std::is_same_v<S, T>) {
    if (outer == 1.0f && inner == 1.0f) {
      std::copy_n(src, n, dst);
      return;
    }
  }
  for (int64_t i = 0; i < n; ++i) dst[i] = from_float<T>(outer * (inner * to_float(src[i])));
}

// Requests the cache lines of row[begin, end) (none for a null row): a row read next from an
// address the hardware prefetcher cannot guess (the next token's, a scattered token's).
template <typename T>
MOEPP_ROW_INLINE void prefetch_lines(const T* row, int64_t begin, int64_t end) {
  constexpr int64_t kPerLine = 64 / sizeof(T);
  for (int64_t j = begin; row != nullptr && j < end; j += kPerLine) __builtin_prefetch(row + j);
}

// acc += w * src
template <typename S>
MOEPP_CPU_WIDE_CLONES void add_scaled(const S* __restrict src, float w, int64_t n, float* __restrict acc) {
  for (int64_t i = 0; i < n; ++i) acc[i] += w * to_float(src[i]);
}

// join(... join(init, term(0)) ..., term(n - 1)) regrouped into L partial results:
// term(i) of the whole blocks of L goes to partial i % L, the tail's to partials 0, 1, ...,
// and the partials are joined into init in order. The order is fixed (deterministic) and
// the block loop vectorises. `term` may store element i as it goes.
template <int L, typename Acc, typename Term, typename Join>
MOEPP_ROW_INLINE Acc lane_reduce(int64_t n, Acc init, Term term, Join join) {
  Acc part[L];
  for (int l = 0; l < L; ++l) part[l] = init;
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    for (int l = 0; l < L; ++l) part[l] = join(part[l], term(i + l));
  }
  for (int l = 0; i < n; ++i, ++l) part[l] = join(part[l], term(i));
  Acc total = init;
  for (int l = 0; l < L; ++l) total = join(total, part[l]);
  return total;
}

// lane_reduce's join for sums.
struct Add {
  template <typename T>
  MOEPP_ROW_INLINE T operator()(T a, T b) const { return a + b; }
};

// sum_i a[i] * b[i], in 16 fp32 partial sums
template <typename S>
MOEPP_CPU_WIDE_CLONES float dot(const float* __restrict a, const S* __restrict b, int64_t n) {
  return lane_reduce<16>(n, 0.0f, [&](int64_t i) { return a[i] * to_float(b[i]); }, Add{});
}

}  // namespace moepp::rows
