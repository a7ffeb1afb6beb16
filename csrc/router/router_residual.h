// The routing-score residual l' = l + r·Gᵀ of the CPU router's forward, one token at a
// time over G transposed (router_cpu.cpp, router_tiles.cpp).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../cpu_rows.h"

namespace moepp::router {

// G transposed with its rows padded with zeros to a multiple of kPad entries, ld:
// gt[m * ld + j] = G[j][m].
template <typename T>
struct ResidualRows {
  static constexpr int kPad = 8;
  std::vector<T> gt;
  int ld = 0;

  ResidualRows(const T* G, int n) : ld((n + kPad - 1) / kPad * kPad) {
    if (G == nullptr) return;
    gt.assign(static_cast<size_t>(n) * ld, T(0));
    for (int j = 0; j < n; ++j) {
      for (int m = 0; m < n; ++m) gt[static_cast<size_t>(m) * ld + j] = G[static_cast<int64_t>(j) * n + m];
    }
  }
};

// l + r·Gᵀ for one token into `out`: the loop over j is contiguous, whole vectors, and
// each sum adds its terms in m order from 0, as route_scores does. acc: scratch of ld.
template <typename T>
MOEPP_ROW_INLINE void add_residual(int n, const ResidualRows<T>& g, const T* __restrict logits, const T* __restrict r,
                                   T* __restrict acc, T* __restrict out) {
  const int ld = g.ld;
  const T* __restrict gt = g.gt.data();
  std::fill(acc, acc + ld, T(0));
  for (int m = 0; m < n; ++m) {
    const T rm = r[m];
    const T* row = gt + static_cast<int64_t>(m) * ld;
    for (int j = 0; j < ld; ++j) acc[j] += rm * row[j];
  }
  for (int j = 0; j < n; ++j) out[j] = logits[j] + acc[j];
}

}  // namespace moepp::router
