// Row loops of the CPU twins, written so the compiler vectorises them: restrict
// pointers, no branches, no libm calls, fp32 accumulation. With GCC on x86-64
// each is compiled twice, for AVX2 + FMA (x86-64-v3) and for the baseline, and
// the loader picks one per machine (target_clones). The kernels need
// -fno-trapping-math for the selects in their element math to vectorise.
#pragma once

#include <cstdint>

#include "numeric.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MOEPP_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MOEPP_CPU_CLONES
#endif

namespace moepp::rows {

// dst = outer * (inner * src)
template <typename T, typename S>
MOEPP_CPU_CLONES void scale(const S* __restrict src, float outer, float inner, int64_t n, T* __restrict dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = from_float<T>(outer * (inner * to_float(src[i])));
}

// acc += w * src
template <typename S>
MOEPP_CPU_CLONES void add_scaled(const S* __restrict src, float w, int64_t n, float* __restrict acc) {
  for (int64_t i = 0; i < n; ++i) acc[i] += w * to_float(src[i]);
}

// sum_i a[i] * b[i], in 16 fp32 partial sums (a fixed order: deterministic)
template <typename S>
MOEPP_CPU_CLONES float dot(const float* __restrict a, const S* __restrict b, int64_t n) {
  constexpr int kLanes = 16;
  float part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) part[l] += a[i + l] * to_float(b[i + l]);
  }
  for (int l = 0; i < n; ++i, ++l) part[l] += a[i] * to_float(b[i]);
  float total = 0.0f;
  for (int l = 0; l < kLanes; ++l) total += part[l];
  return total;
}

}  // namespace moepp::rows
