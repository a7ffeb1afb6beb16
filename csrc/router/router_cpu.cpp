// CPU twin of the fused router: one thread per token range. The forward of up to
// kTileMaxExperts experts runs on tiles of tokens (router_tiles.cpp); above that, a
// token at a time, computing route_scores and select_top_k's results in row loops of
// its own that vectorise (the same values, sums in partials, and the same ids), then
// the shared route_weights. The backward is router_math.h's route_token_backward. The
// kernel's per-token execution itself runs on the CPU in router_lanes.cpp.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../cpu_rows.h"
#include "../parallel.h"
#include "router.h"
#include "router_residual.h"
#include "router_tiles.h"

namespace moepp::router {

namespace {
// A worker's least share: 512 tokens of up to 32 experts, fewer tokens of longer rows
// (a row of 768 is about 2 us of work).
int64_t tokens_per_worker(int num_experts) {
  return std::clamp<int64_t>(512 * 32 / std::max(num_experts, 1), 1, 512);
}
// Partial sums / maxima of the row loops (rows::lane_reduce).
constexpr int kLanes = 8;

// The forward's row loops below are MOEPP_ROW_INLINE: route_range, one clone per
// instruction set, holds a token range's whole forward, so each loop is compiled
// for the clone's vectors and no call per row goes through the clones' dispatch.

// Rows read as rows of kColumns entries: column maxima are a vertical loop the
// compiler vectorises (lane_reduce's maxima it compiles to scalar code).
constexpr int kColumns = 32;
// maxima[c] = max over the row's whole rows of kColumns of v[r * kColumns + c]
// (NaN entries never win; -inf where there are none); returns the entries covered.
template <typename T>
MOEPP_ROW_INLINE int column_maxima(int n, const T* __restrict v, T* __restrict maxima) {
  for (int c = 0; c < kColumns; ++c) maxima[c] = neg_inf<T>();
  const int whole = n / kColumns * kColumns;
  for (int j = 0; j < whole; j += kColumns) {
    for (int c = 0; c < kColumns; ++c) maxima[c] = v[j + c] > maxima[c] ? v[j + c] : maxima[c];
  }
  return whole;
}

// max_j v_j (NaN entries never win; -inf for a row of them). Any order gives the
// same maximum; a ±0 tie only feeds subtractions.
template <typename T>
MOEPP_ROW_INLINE T row_max(int n, const T* __restrict v) {
  T maxima[kColumns];
  T m = neg_inf<T>();
  for (int j = column_maxima(n, v, maxima); j < n; ++j) m = v[j] > m ? v[j] : m;
  for (int c = 0; c < kColumns; ++c) m = maxima[c] > m ? maxima[c] : m;
  return m;
}

// select_top_k for one thread: a best-first list of k kept by insertion. An
// entry enters only by beating the k-th strictly, and entries are offered in id
// order, so equal scores keep the lowest ids first, as `better` orders them
// (scores are never NaN here). O(N + k * insertions) instead of O(k * N).
template <typename T>
struct BestFirst {
  BestFirst(int k_, int32_t* ids_) : k(k_), ids(ids_) {}
  int k;
  int32_t* ids;
  int count = 0;
  T best[kMaxTopK];

  MOEPP_ROW_INLINE void offer(T s, int32_t j) {
    if (count == k && !(s > best[k - 1])) return;
    int pos = count < k ? count++ : k - 1;
    while (pos > 0 && s > best[pos - 1]) {
      best[pos] = best[pos - 1];
      ids[pos] = ids[pos - 1];
      --pos;
    }
    best[pos] = s;
    ids[pos] = j;
  }
};

template <typename T>
MOEPP_ROW_INLINE void select_top_k_serial(int n, int k, const T* score, int32_t* ids) {
  BestFirst<T> list{k, ids};
  for (int j = 0; j < n; ++j) list.offer(score[j], j);
}

// The same selection for long rows, in loops without data-dependent branches.
// The row's column_maxima: the k largest of them are k distinct entries, so the
// k-th best entry is at least the k-th largest maximum t. Only entries reaching t
// can win (about 1.2 k of them on random rows), and an entry's place is the number
// of those that beat it (a higher score, or an equal one at a lower id), as
// `better` orders them. More than kMaxCandidates (ties at t) fall back to the
// serial pass. The insertion's branches mispredict on random rows; these loops
// vectorise, except the candidates' gather.
constexpr int kMaxCandidates = 64;
constexpr int kRankLanes = 8;
static_assert(kMaxTopK <= kColumns, "the column maxima must hold k distinct entries");

template <typename T>
MOEPP_ROW_INLINE T kth_largest_column_maximum(int k, const T* __restrict maxima) {
  // The smallest maximum that fewer than k others exceed (the counts for all
  // maxima at once, a vector of them per maximum c). The counts are kept in T,
  // exactly: with float compares and selects only, every loop here vectorises.
  T above[kColumns] = {};
  for (int c = 0; c < kColumns; ++c) {
    const T m = maxima[c];
    for (int i = 0; i < kColumns; ++i) above[i] += m > maxima[i] ? T(1) : T(0);
  }
  // Their minimum: the kept maxima (+inf for the others) folded in halves, vertical
  // loops that vectorise (a float minimum reduction does not).
  T kept[kColumns];
  for (int i = 0; i < kColumns; ++i) kept[i] = above[i] < T(k) ? maxima[i] : std::numeric_limits<T>::infinity();
  for (int half = kColumns / 2; half > 0; half /= 2) {
    for (int i = 0; i < half; ++i) kept[i] = kept[i + half] < kept[i] ? kept[i + half] : kept[i];
  }
  return kept[0];
}

// Bit c of the mask: row[c] >= threshold (a loop of compares that vectorises).
template <typename T>
MOEPP_ROW_INLINE uint32_t reaching(const T* __restrict row, T threshold) {
  uint32_t mask = 0;
  for (int c = 0; c < kColumns; ++c) mask |= (row[c] >= threshold ? 1u : 0u) << c;
  return mask;
}

template <typename T>
MOEPP_ROW_INLINE void select_top_k_columns(int n, int k, const T* __restrict score, const T* __restrict maxima,
                                           int32_t* ids) {
  const T threshold = kth_largest_column_maximum(k, maxima);
  int32_t candidates[kMaxCandidates];
  T value[kMaxCandidates + kRankLanes];
  int count = 0;
  const int whole = n / kColumns * kColumns;
  for (int base = 0; base < whole; base += kColumns) {  // the candidates, in id order
    for (uint32_t mask = reaching(score + base, threshold); mask != 0; mask &= mask - 1) {
      if (count == kMaxCandidates) return select_top_k_serial(n, k, score, ids);
      candidates[count] = base + __builtin_ctz(mask);
      value[count] = score[candidates[count]];
      ++count;
    }
  }
  for (int j = whole; j < n; ++j) {
    if (!(score[j] >= threshold)) continue;
    if (count == kMaxCandidates) return select_top_k_serial(n, k, score, ids);
    candidates[count] = j;
    value[count++] = score[j];
  }
  // Padding to whole vectors of kRankLanes: -inf beats no candidate, and ties one
  // only at a higher index.
  const int padded = (count + kRankLanes - 1) / kRankLanes * kRankLanes;
  for (int c = count; c < padded; ++c) value[c] = neg_inf<T>();
  for (int i = 0; i < count; ++i) {
    const T s = value[i];
    int place = 0;
    for (int c = 0; c < padded; ++c) place += value[c] > s || (value[c] == s && c < i) ? 1 : 0;
    if (place < k) ids[place] = candidates[i];
  }
}

// The same selection for small k in k passes of two vectorising loops: the best
// score left, then the lowest id holding it (ties to the lowest id); a taken
// entry becomes NaN, which neither loop picks (scores are never NaN here). The
// insertion's data-dependent branches mispredict on random rows; these loops
// have none.
template <typename T>
MOEPP_ROW_INLINE int32_t take_best(int n, T* __restrict sel) {
  const T best = row_max(n, sel);
  int32_t first = n;
  for (int i = n - 1; i >= 0; --i) first = sel[i] == best ? i : first;
  sel[first] = std::numeric_limits<T>::quiet_NaN();
  return first;
}

// `maxima`: the scores' column_maxima.
template <typename T>
MOEPP_ROW_INLINE void select_top_k_cpu(int n, int k, T* sel, const T* maxima, int32_t* ids) {
  if (k > 2) {
    if (n >= 4 * kColumns) return select_top_k_columns(n, k, sel, maxima, ids);
    return select_top_k_serial(n, k, sel, ids);
  }
  for (int s = 0; s < k; ++s) ids[s] = take_best(n, sel);
}

// dL/dr = dl'·G for one token, each sum over j in order from 0 as
// route_token_backward adds it; G's rows are contiguous in m, so the loop over m
// vectorises.
template <typename T>
MOEPP_CPU_CLONES void residual_backward(int n, const T* __restrict grad_logits, const T* __restrict G,
                                        T* __restrict grad_prev) {
  std::fill(grad_prev, grad_prev + n, T(0));
  for (int j = 0; j < n; ++j) {
    const T dj = grad_logits[j];
    const T* row = G + static_cast<int64_t>(j) * n;
    for (int m = 0; m < n; ++m) grad_prev[m] += dj * row[m];
  }
}

// The row loops of route_scores_row: sums and maxima in partials (lane_reduce), no
// libm call (softmax_exp is exp_approx in fp32).
// Σ_j (v_j - shift), or Σ_j (v_j - shift)² when kSquares.
template <bool kSquares, typename T>
MOEPP_ROW_INLINE T row_sum(int n, const T* __restrict v, T shift) {
  return rows::lane_reduce<kLanes>(n, T(0), [&](int64_t j) {
    const T d = v[j] - shift;
    return kSquares ? d * d : d;
  }, rows::Add{});
}

// z_j = routing_value(v_j * scale) (its NaN rule written out: the loop vectorises
// only so), e_j = e^(z_j - max) into e; returns Σ_j e_j. Two loops: the sum's
// partials beside the exponential's constants spill out of the vector registers.
template <typename T>
MOEPP_ROW_INLINE T exp_row(int n, const T* __restrict v, T scale, T max, T* __restrict e) {
  for (int j = 0; j < n; ++j) {
    const T s = v[j] * scale;
    e[j] = softmax_exp((s != s ? neg_inf<T>() : s) - max);
  }
  return rows::lane_reduce<kLanes>(n, T(0), [&](int64_t j) { return e[j]; }, rows::Add{});
}

// selection_scores for a finite softmax, e_j = e^(z_j - max) in `sel`: p_j = e_j / sum
// (added into prob_acc when given) and the score routing_value(p_j or z_j, + bias_j)
// back into sel, routing_value written out as in exp_row; the scores' column_maxima
// into `maxima` in the same pass.
template <typename T>
MOEPP_ROW_INLINE void score_row(int n, bool by_prob, const T* __restrict v, T scale, T sum, const T* __restrict bias,
                                T* __restrict sel, T* __restrict prob_acc, T* __restrict maxima) {
  const auto score_of = [&](int j) {
    const T p = sel[j] / sum;
    if (prob_acc != nullptr) prob_acc[j] += p;
    const T s = v[j] * scale;
    T score = by_prob ? p : (s != s ? neg_inf<T>() : s);
    if (bias != nullptr) score += bias[j];
    return score != score ? neg_inf<T>() : score;
  };
  for (int c = 0; c < kColumns; ++c) maxima[c] = neg_inf<T>();
  const int whole = n / kColumns * kColumns;
  for (int j = 0; j < whole; j += kColumns) {
    for (int c = 0; c < kColumns; ++c) {
      const T score = score_of(j + c);
      sel[j + c] = score;
      maxima[c] = score > maxima[c] ? score : maxima[c];
    }
  }
  for (int j = whole; j < n; ++j) sel[j] = score_of(j);
}

// route_scores for one token on one thread, l' given in `val`: softmax_stats's
// statistics, skips and limits (its sums in partials), p into prob_acc, the
// selection scores into `sel` and their column_maxima into `maxima`.
template <typename T>
MOEPP_ROW_INLINE SoftmaxStats<T> route_scores_row(const RouterOptions& opt, const T* val, const T* bias, T* sel,
                                                  T* prob_acc, T* maxima) {
  const int n = opt.num_experts;
  SoftmaxStats<T> st{};
  st.scale = T(1);
  st.normalized = false;
  if (opt.normalize && n > 1) {
    st.mean = row_sum<false>(n, val, T(0)) / T(n);
    st.var = row_sum<true>(n, val, st.mean) / T(n - 1);
    const T scale = T(opt.sigma) / std::sqrt(st.var);
    if (std::isfinite(st.var) && st.var > T(0) && std::isfinite(scale)) {
      st.scale = scale;
      st.normalized = true;
    }
  }
  // max_j z_j without storing z: scale > 0 and rounding is monotone, so
  // max_j fl(v_j * scale) = fl(max_j v_j * scale) (NaN never wins either).
  st.max_z = row_max(n, val) * st.scale;
  if (!st.finite_softmax()) {  // no finite maximum: the shared per-token code and its limits
    const SoftmaxStats<T> limit = softmax_stats(SerialGroup{}, opt, val, sel);
    selection_scores(SerialGroup{}, opt, limit, val, bias, sel, prob_acc);
    column_maxima(n, sel, maxima);
    return limit;
  }
  st.sum_exp = st.n_pos_inf = exp_row(n, val, st.scale, st.max_z, sel);
  score_row(n, opt.gating == Gating::kSoftmaxTopK, val, st.scale, st.sum_exp, bias, sel, prob_acc, maxima);
  return st;
}

// The forward of tokens [begin, end) on one thread; `counts` and `prob_acc` (or null)
// are the thread's partials, the other buffers its scratch.
template <typename T>
MOEPP_CPU_CLONES void route_range(const RouterOptions& opt, const ForwardArgs<T>& a, const ResidualRows<T>& g,
                                  int64_t begin, int64_t end, T* sel, T* acc, T* routed, T* prob_acc,
                                  int64_t* counts) {
  const int n = opt.num_experts;
  const int k = opt.top_k;
  int32_t ids[kMaxTopK];
  T gates[kMaxTopK];
  T maxima[kColumns];
  for (int64_t t = begin; t < end; ++t) {
    const T* logits = a.logits + t * n;
    // The next row on its way while this one is routed, half before each of the two
    // stages: a long row is a few passes of arithmetic over data in L1, and its first
    // pass would otherwise wait on memory (and a burst of prefetches waits too).
    const T* next = t + 1 < end ? logits + n : nullptr;
    rows::prefetch_lines(next, 0, n / 2);
    if (a.G != nullptr) {  // l' first, then route it as logits without a residual: the same values
      T* out = a.logits_out != nullptr ? a.logits_out + t * n : routed;
      add_residual(n, g, logits, a.prev + t * n, acc, out);
      logits = out;
    }
    const SoftmaxStats<T> st = route_scores_row(opt, logits, a.bias, sel, prob_acc, maxima);
    rows::prefetch_lines(next, n / 2, n);
    select_top_k_cpu(n, k, sel, maxima, ids);
    route_weights(opt, st, logits, ids, gates);
    for (int s = 0; s < k; ++s) {
      a.ids[t * k + s] = ids[s];
      a.weights[t * k + s] = gates[s];
      ++counts[ids[s]];
    }
  }
}
}  // namespace

template <typename T>
void forward_cpu(const RouterOptions& opt, const ForwardArgs<T>& a, int num_threads) {
  const int n = opt.num_experts;
  const int workers = choose_workers(a.tokens, num_threads, tokens_per_worker(n));
  const bool tiles = n <= kTileMaxExperts;
  // Per worker: slot counts and sums of p (per expert, and per lane for the tiles).
  const size_t prob_size = a.prob_partials == nullptr ? 0 : tiles ? static_cast<size_t>(n) * kTileTokens : n;
  std::vector<std::vector<T>> prob(workers, std::vector<T>(prob_size, T(0)));
  std::vector<std::vector<int64_t>> counts(workers, std::vector<int64_t>(n, 0));
  const ResidualRows<T> g(a.G, n);
  parallel_for(a.tokens, workers, [&](int w, int64_t begin, int64_t end) {
    T* prob_acc = a.prob_partials != nullptr ? prob[w].data() : nullptr;
    if (tiles) return forward_tiles(opt, a, g, begin, end, counts[w].data(), prob_acc);
    std::vector<T> sel(n), acc(a.G != nullptr ? g.ld : 0), routed(a.G != nullptr && a.logits_out == nullptr ? n : 0);
    route_range(opt, a, g, begin, end, sel.data(), acc.data(), routed.data(), prob_acc, counts[w].data());
  });
  for (int j = 0; j < n; ++j) {
    int64_t c = 0;
    T p = 0;
    for (int w = 0; w < workers; ++w) {
      c += counts[w][j];
      if (a.prob_partials == nullptr) continue;
      if (!tiles) p += prob[w][j];
      for (int l = 0; tiles && l < kTileTokens; ++l) p += prob[w][static_cast<size_t>(j) * kTileTokens + l];
    }
    a.counts[j] = static_cast<int32_t>(c);
    if (a.prob_partials != nullptr) a.prob_partials[j] = p;
  }
}

// The backward of tokens [begin, end): like route_range, one clone per instruction set
// holds the whole token loop, so route_token_backward's row loops are compiled for its vectors.
template <typename T>
MOEPP_CPU_CLONES void backward_range(const RouterOptions& opt, const BackwardArgs<T>& a, int64_t begin, int64_t end,
                                     T* buf) {
  const int n = opt.num_experts;
  const int k = opt.top_k;
  for (int64_t t = begin; t < end; ++t) {
    T* grad_logits = a.grad_logits + t * n;
    route_token_backward(SerialGroup{}, opt, a.ids + t * k, a.grad_weights ? a.grad_weights + t * k : nullptr,
                         a.grad_logits_out ? a.grad_logits_out + t * n : nullptr, a.grad_prob_sum,
                         static_cast<const T*>(nullptr), n, grad_logits, static_cast<T*>(nullptr), a.routed + t * n,
                         buf);
    if (a.grad_prev != nullptr) residual_backward(n, grad_logits, a.G, a.grad_prev + t * n);
  }
}

template <typename T>
void backward_cpu(const RouterOptions& opt, const BackwardArgs<T>& a, int num_threads) {
  const int workers = choose_workers(a.tokens, num_threads, tokens_per_worker(opt.num_experts));
  parallel_for(a.tokens, workers, [&](int, int64_t begin, int64_t end) {
    std::vector<T> buf(opt.num_experts);
    backward_range(opt, a, begin, end, buf.data());
  });
}

template void forward_cpu<float>(const RouterOptions&, const ForwardArgs<float>&, int);
template void forward_cpu<double>(const RouterOptions&, const ForwardArgs<double>&, int);
template void backward_cpu<float>(const RouterOptions&, const BackwardArgs<float>&, int);
template void backward_cpu<double>(const RouterOptions&, const BackwardArgs<double>&, int);

}  // namespace moepp::router
