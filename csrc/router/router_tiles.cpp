// The CPU router's forward for N <= kTileMaxExperts, a tile of kTileTokens tokens at
// a time held expert-major (x[j][l]: expert j of the tile's token l). Per token it
// computes what route_token computes, the sums over the experts in order from 0
// (SerialGroup's order) and the selection with the same ties (lowest id); tokens
// past the range's end fill the last tile as lanes of zeros that are not written.
// Rows whose softmax has no finite maximum take the shared per-token code.
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "../cpu_rows.h"
#include "router_tiles.h"

namespace moepp::router {

namespace {
constexpr int W = kTileTokens;

// An integer ordered as the scores (never NaN) are, with -0 as +0 (so that they tie, as
// equal scores do): the bits, the magnitude's flipped below zero. Its minimum lies below
// every score's and marks a taken entry.
template <typename T>
using OrderKey = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;

template <typename T>
MOEPP_ROW_INLINE OrderKey<T> order_key(T score) {
  using K = OrderKey<T>;
  const T unsigned_zero = score + T(0);  // -0 + 0 = +0
  K bits;
  std::memcpy(&bits, &unsigned_zero, sizeof(K));
  return bits ^ ((bits >> (8 * sizeof(K) - 1)) & std::numeric_limits<K>::max());
}

template <typename T>
MOEPP_ROW_INLINE void load_tile(int n, int count, const T* rows, T (*x)[W]) {
  if (count < W) {
    for (int j = 0; j < n; ++j) {
      for (int l = 0; l < W; ++l) x[j][l] = T(0);
    }
  }
  for (int l = 0; l < count; ++l) {
    for (int j = 0; j < n; ++j) x[j][l] = rows[static_cast<int64_t>(l) * n + j];
  }
}

// A row whose softmax has no finite maximum: route_scores' limits and the
// serial selection, p into lane l of prob_lanes.
template <typename T>
MOEPP_ROW_INLINE SoftmaxStats<T> route_limit_row(const RouterOptions& opt, const T* val, const T* bias, int l,
                                                 T* prob_lanes, int32_t* ids) {
  const int n = opt.num_experts;
  T sel[kTileMaxExperts];
  T prob[kTileMaxExperts] = {};
  const SoftmaxStats<T> st = softmax_stats(SerialGroup{}, opt, val, sel);
  selection_scores(SerialGroup{}, opt, st, val, bias, sel, prob);
  if (prob_lanes != nullptr) {
    for (int j = 0; j < n; ++j) prob_lanes[j * W + l] += prob[j];
  }
  select_top_k(SerialGroup{}, opt, sel, ids);
  return st;
}

// One tile: tokens t0 .. t0 + count - 1 (count <= W).
template <typename T>
MOEPP_ROW_INLINE void route_tile(const RouterOptions& opt, const ForwardArgs<T>& a, const ResidualRows<T>& g,
                                 int64_t t0, int count, T* routed, int64_t* counts, T* prob_lanes) {
  const int n = opt.num_experts;
  const int k = opt.top_k;
  alignas(32) T v[kTileMaxExperts][W];  // l'
  alignas(32) T e[kTileMaxExperts][W];  // z, then e^(z - max), then the selection scores
  const T* val = a.logits + t0 * n;  // l' of the tile's rows, row-major
  if (a.G != nullptr) {
    T acc[kTileMaxExperts];
    T* out = a.logits_out != nullptr ? a.logits_out + t0 * n : routed;
    for (int l = 0; l < count; ++l) {
      const int64_t row = static_cast<int64_t>(l) * n;
      add_residual(n, g, val + row, a.prev + t0 * n + row, acc, out + row);
    }
    val = out;
  }
  load_tile(n, count, val, v);
  // Statistics (softmax_stats, per lane).
  T mean[W] = {}, var[W] = {}, scale[W], max_z[W], sum[W] = {};
  bool normalized[W];
  for (int l = 0; l < W; ++l) {
    scale[l] = T(1);
    normalized[l] = false;
    max_z[l] = neg_inf<T>();
  }
  if (opt.normalize && n > 1) {
    for (int j = 0; j < n; ++j) {
      for (int l = 0; l < W; ++l) mean[l] += v[j][l];
    }
    for (int l = 0; l < W; ++l) mean[l] /= T(n);
    for (int j = 0; j < n; ++j) {
      for (int l = 0; l < W; ++l) var[l] += (v[j][l] - mean[l]) * (v[j][l] - mean[l]);
    }
    for (int l = 0; l < W; ++l) {
      var[l] /= T(n - 1);
      const T s = T(opt.sigma) / std::sqrt(var[l]);
      normalized[l] = std::isfinite(var[l]) && var[l] > T(0) && std::isfinite(s);
      scale[l] = normalized[l] ? s : T(1);
    }
  }
  for (int j = 0; j < n; ++j) {  // z = routing_value(l' * scale), written out so the loop vectorises
    for (int l = 0; l < W; ++l) {
      const T s = v[j][l] * scale[l];
      e[j][l] = s != s ? neg_inf<T>() : s;
      max_z[l] = e[j][l] > max_z[l] ? e[j][l] : max_z[l];
    }
  }
  for (int j = 0; j < n; ++j) {
    for (int l = 0; l < W; ++l) {
      e[j][l] = softmax_exp(e[j][l] - max_z[l]);
      sum[l] += e[j][l];
    }
  }
  // selection_scores: p (into the lanes of valid rows with a finite softmax) and the scores.
  T take_p[W];
  for (int l = 0; l < W; ++l) {
    take_p[l] = l < count && max_z[l] != neg_inf<T>() && max_z[l] != pos_inf<T>() ? T(1) : T(0);
  }
  const bool by_prob = opt.gating == Gating::kSoftmaxTopK;
  for (int j = 0; j < n; ++j) {
    const T b = a.bias != nullptr ? a.bias[j] : T(0);
    for (int l = 0; l < W; ++l) {
      const T p = e[j][l] / sum[l];
      if (prob_lanes != nullptr) prob_lanes[j * W + l] += take_p[l] != T(0) ? p : T(0);
      const T s = v[j][l] * scale[l];
      const T score = (by_prob ? p : (s != s ? neg_inf<T>() : s)) + b;
      e[j][l] = score != score ? neg_inf<T>() : score;
    }
  }
  // select_top_k: k passes over the scores' order keys, each the best key left and the
  // lowest id holding it (strictly greater replaces); a taken entry's key becomes the minimum.
  using K = OrderKey<T>;
  alignas(32) K key[kTileMaxExperts][W];
  for (int j = 0; j < n; ++j) {
    for (int l = 0; l < W; ++l) key[j][l] = order_key(e[j][l]);
  }
  int32_t ids[kMaxTopK][W];
  for (int s = 0; s < k; ++s) {
    K best[W], best_id[W];
    for (int l = 0; l < W; ++l) {
      best[l] = std::numeric_limits<K>::min();
      best_id[l] = 0;
    }
    for (int j = 0; j < n; ++j) {
      for (int l = 0; l < W; ++l) {
        const bool take = key[j][l] > best[l];
        best[l] = take ? key[j][l] : best[l];
        best_id[l] = take ? K(j) : best_id[l];
      }
    }
    for (int l = 0; l < W; ++l) {
      ids[s][l] = static_cast<int32_t>(best_id[l]);
      key[best_id[l]][l] = std::numeric_limits<K>::min();
    }
  }
  // route_weights per row.
  for (int l = 0; l < count; ++l) {
    const int64_t t = t0 + l;
    const T* row = val + static_cast<int64_t>(l) * n;
    int32_t row_ids[kMaxTopK];
    T gates[kMaxTopK];
    SoftmaxStats<T> st{mean[l], var[l], scale[l], normalized[l], max_z[l], sum[l], sum[l]};
    if (st.finite_softmax()) {
      for (int s = 0; s < k; ++s) row_ids[s] = ids[s][l];
    } else {
      st = route_limit_row(opt, row, a.bias, l, prob_lanes, row_ids);
    }
    route_weights(opt, st, row, row_ids, gates);
    for (int s = 0; s < k; ++s) {
      a.ids[t * k + s] = row_ids[s];
      a.weights[t * k + s] = gates[s];
      ++counts[row_ids[s]];
    }
  }
}
}  // namespace

template <typename T>
MOEPP_CPU_CLONES void forward_tiles(const RouterOptions& opt, const ForwardArgs<T>& a, const ResidualRows<T>& g,
                                    int64_t begin, int64_t end, int64_t* counts, T* prob_lanes) {
  T routed[W * kTileMaxExperts];  // l' of the tile when logits_out is not given
  for (int64_t t = begin; t < end; t += W) {
    route_tile(opt, a, g, t, static_cast<int>(end - t < W ? end - t : W), routed, counts, prob_lanes);
  }
}

template void forward_tiles<float>(const RouterOptions&, const ForwardArgs<float>&, const ResidualRows<float>&,
                                   int64_t, int64_t, int64_t*, float*);
template void forward_tiles<double>(const RouterOptions&, const ForwardArgs<double>&, const ResidualRows<double>&,
                                    int64_t, int64_t, int64_t*, double*);

}  // namespace moepp::router
