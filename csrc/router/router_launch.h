// Launch geometry of the CUDA router, shared by its launcher, the CPU lane test
// (router_lanes.cpp) and the tests of the shared-memory arithmetic: LANES threads
// per token (a warp slice), kThreads / LANES tokens per block, and the dynamic
// shared memory of a launch. Host code only.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace moepp::router {

constexpr int kThreads = 128;
constexpr int kMaxBlocks = 4096;
constexpr int kElementsPerLane = 4;
constexpr size_t kMaxStagedG = 128 * 129 * sizeof(double);  // fp64 up to N = 128 (fp32 up to N = 181)

// Lanes per token: enough for about kElementsPerLane experts each, at most a warp.
inline int lanes_for(int num_experts) {
  int lanes = 1;
  while (lanes < 32 && lanes * kElementsPerLane < num_experts) lanes *= 2;
  return lanes;
}

// Calls f(std::integral_constant<int, lanes>) for lanes in {1, 2, 4, 8, 16, 32}.
template <typename F>
void with_lanes(int lanes, F&& f) {
  switch (lanes) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 16: f(std::integral_constant<int, 16>{}); break;
    default: f(std::integral_constant<int, 32>{}); break;
  }
}

inline int64_t blocks_for(int64_t tokens, int lanes) {
  const int64_t groups = kThreads / lanes;
  return std::min<int64_t>((tokens + groups - 1) / groups, kMaxBlocks);
}

// A launch's dynamic shared memory: per group the staged row and the selection
// scratch (and the probability sums with the statistics; the forward adds the
// block's expert counts), then G [n, n + 1] when it is staged.
struct SharedLayout {
  size_t bytes;
  bool staged;
};

// G is staged when it is small and fits the kernel's budget (the device's opt-in
// limit less the kernel's static shared memory) next to the scratch; otherwise
// the kernel reads it through L1/L2.
inline SharedLayout shared_layout(bool forward, size_t elem_bytes, int n, bool stats, bool has_g, size_t budget) {
  const size_t groups = kThreads / lanes_for(n);
  const size_t rows = forward && stats ? 3 : 2;
  const size_t scratch = elem_bytes * groups * n * rows + (forward ? sizeof(int32_t) * n : 0);
  const size_t g_bytes = elem_bytes * n * (n + 1);
  const bool staged = has_g && g_bytes <= kMaxStagedG && scratch + g_bytes <= budget;
  return {scratch + (staged ? g_bytes : 0), staged};
}

}  // namespace moepp::router
