// CPU twin of the fused router: one thread per token range. The forward computes
// route_scores and select_top_k's results in row loops of its own that vectorise
// (the same values, sums in partials, and the same ids), then the shared
// route_weights; the backward is router_math.h's route_token_backward. The
// kernel's per-token execution itself runs on the CPU in router_lanes.cpp.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../cpu_rows.h"
#include "../parallel.h"
#include "router.h"

namespace moepp::router {

namespace {
constexpr int64_t kTokensPerWorker = 512;
// Partial sums / maxima of the row loops, combined in a fixed order (deterministic).
constexpr int kLanes = 8;

// max_j v_j in kLanes partial maxima (NaN entries never win; -inf for a row of
// them). Inlined into its callers' clones.
template <typename T>
inline T row_max(int n, const T* __restrict v) {
  T part[kLanes];
  for (int l = 0; l < kLanes; ++l) part[l] = neg_inf<T>();
  int j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) part[l] = v[j + l] > part[l] ? v[j + l] : part[l];
  }
  for (int l = 0; j < n; ++j, ++l) part[l] = v[j] > part[l] ? v[j] : part[l];
  T m = part[0];
  for (int l = 1; l < kLanes; ++l) m = part[l] > m ? part[l] : m;
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

  void offer(T s, int32_t j) {
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
void select_top_k_serial(int n, int k, const T* score, int32_t* ids) {
  BestFirst<T> list{k, ids};
  for (int j = 0; j < n; ++j) list.offer(score[j], j);
}

// Maxima of the row's blocks of kLanes (block b: entries [b * kLanes, (b + 1) * kLanes)).
template <typename T>
MOEPP_CPU_CLONES void block_maxima(int blocks, const T* __restrict score, T* __restrict maxima) {
  for (int b = 0; b < blocks; ++b) {
    T m = score[b * kLanes];
    for (int l = 1; l < kLanes; ++l) m = score[b * kLanes + l] > m ? score[b * kLanes + l] : m;
    maxima[b] = m;
  }
}

// The same selection for long rows. The k largest block maxima are k distinct
// entries, so the k-th best entry is at least the k-th largest block maximum t:
// only entries reaching t in blocks whose maximum reaches t (k of them, more with
// ties), and the tail, can win, and only they are offered, still in id order. The full
// row's insertion branches mispredict on random rows; the maxima vectorise.
template <typename T>
void select_top_k_blocked(int n, int k, const T* score, int32_t* ids) {
  const int blocks = n / kLanes;
  T maxima[kMaxExperts / kLanes];
  block_maxima(blocks, score, maxima);
  select_top_k_serial(blocks, k, maxima, ids);
  const T threshold = maxima[ids[k - 1]];
  BestFirst<T> list{k, ids};
  for (int b = 0; b < blocks; ++b) {
    if (!(maxima[b] >= threshold)) continue;
    for (int j = b * kLanes; j < (b + 1) * kLanes; ++j) {
      if (score[j] >= threshold) list.offer(score[j], j);
    }
  }
  for (int j = blocks * kLanes; j < n; ++j) list.offer(score[j], j);
}

// The same selection for small k in k passes of two vectorising loops: the best
// score left, then the lowest id holding it (ties to the lowest id); a taken
// entry becomes NaN, which neither loop picks (scores are never NaN here). The
// insertion's data-dependent branches mispredict on random rows; these loops
// have none.
template <typename T>
MOEPP_CPU_CLONES int32_t take_best(int n, T* __restrict sel) {
  const T best = row_max(n, sel);
  int32_t first = n;
  for (int i = n - 1; i >= 0; --i) first = sel[i] == best ? i : first;
  sel[first] = std::numeric_limits<T>::quiet_NaN();
  return first;
}

template <typename T>
void select_top_k_cpu(int n, int k, T* sel, int32_t* ids) {
  if (k > 2) {
    if (n >= 4 * kLanes * k) return select_top_k_blocked(n, k, sel, ids);
    return select_top_k_serial(n, k, sel, ids);
  }
  for (int s = 0; s < k; ++s) ids[s] = take_best(n, sel);
}

// l + r·Gᵀ for one token with G transposed and its rows padded with zeros to a
// multiple of kLanes, `ld` (gt[m * ld + j] = G[j][m]): the loop over j is
// contiguous, whole vectors, and each sum adds its terms in m order from 0, as
// route_scores does. acc has ld entries.
template <typename T>
MOEPP_CPU_CLONES void add_residual(int n, int ld, const T* __restrict logits, const T* __restrict r,
                                   const T* __restrict gt, T* __restrict acc, T* __restrict out) {
  std::fill(acc, acc + ld, T(0));
  for (int m = 0; m < n; ++m) {
    const T rm = r[m];
    const T* row = gt + static_cast<int64_t>(m) * ld;
    for (int j = 0; j < ld; ++j) acc[j] += rm * row[j];
  }
  for (int j = 0; j < n; ++j) out[j] = logits[j] + acc[j];
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

// The row loops of route_scores_row. Sums and maxima go through kLanes partial
// results combined in a fixed order (deterministic), so the compiler vectorises
// them; no libm call (softmax_exp is exp_approx in fp32).
// Σ_j (v_j - shift), or Σ_j (v_j - shift)² when kSquares.
template <bool kSquares, typename T>
MOEPP_CPU_CLONES T row_sum(int n, const T* __restrict v, T shift) {
  T part[kLanes] = {};
  int j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const T d = v[j + l] - shift;
      part[l] += kSquares ? d * d : d;
    }
  }
  for (int l = 0; j < n; ++j, ++l) {
    const T d = v[j] - shift;
    part[l] += kSquares ? d * d : d;
  }
  T total = 0;
  for (int l = 0; l < kLanes; ++l) total += part[l];
  return total;
}

// z_j = routing_value(v_j * scale) into z; returns max_j z_j. Two loops: the
// compiler vectorises the select and the partial maxima apart, not together.
template <typename T>
MOEPP_CPU_CLONES T scaled_row(int n, const T* __restrict v, T scale, T* __restrict z) {
  for (int j = 0; j < n; ++j) {
    const T s = v[j] * scale;
    z[j] = s != s ? neg_inf<T>() : s;
  }
  return row_max(n, z);
}

// z_j <- e^(z_j - max), in place; returns Σ_j of them.
template <typename T>
MOEPP_CPU_CLONES T exp_row(int n, T* __restrict z, T max) {
  T part[kLanes] = {};
  int j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      z[j + l] = softmax_exp(z[j + l] - max);
      part[l] += z[j + l];
    }
  }
  for (int l = 0; j < n; ++j, ++l) {
    z[j] = softmax_exp(z[j] - max);
    part[l] += z[j];
  }
  T total = 0;
  for (int l = 0; l < kLanes; ++l) total += part[l];
  return total;
}

// From e_j = e^(z_j - max) in `sel`: p_j = e_j / sum (added into prob_acc when
// given) and the selection score routing_value(p_j or z_j, + bias_j) back into sel.
template <typename T>
MOEPP_CPU_CLONES void score_row(int n, bool by_prob, const T* __restrict v, T scale, T sum, const T* __restrict bias,
                                T* __restrict sel, T* __restrict prob_acc) {
  for (int j = 0; j < n; ++j) {
    const T p = sel[j] / sum;
    if (prob_acc != nullptr) prob_acc[j] += p;
    const T s = v[j] * scale;
    T score = by_prob ? p : (s != s ? neg_inf<T>() : s);
    if (bias != nullptr) score += bias[j];
    sel[j] = score != score ? neg_inf<T>() : score;
  }
}

// route_scores for one token on one thread, l' given in `val`: the same statistics,
// skips and limits as softmax_stats (its sums in partials), p into prob_acc, the
// selection scores into `sel`.
template <typename T>
SoftmaxStats<T> route_scores_row(const RouterOptions& opt, const T* val, const T* bias, T* sel, T* prob_acc) {
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
  st.max_z = scaled_row(n, val, st.scale, sel);
  const bool by_prob = opt.gating == Gating::kSoftmaxTopK;
  if (st.finite_softmax()) {
    st.sum_exp = st.n_pos_inf = exp_row(n, sel, st.max_z);
    score_row(n, by_prob, val, st.scale, st.sum_exp, bias, sel, prob_acc);
    return st;
  }
  // No finite maximum: p follows SoftmaxStats::prob's limits (sum_exp counts the +inf entries).
  T count = 0;
  for (int j = 0; j < n; ++j) count += st.max_z == pos_inf<T>() && sel[j] == pos_inf<T>() ? T(1) : T(0);
  st.sum_exp = st.n_pos_inf = count;
  for (int j = 0; j < n; ++j) {
    const T p = st.prob(val[j]);
    if (prob_acc != nullptr) prob_acc[j] += p;
    T score = by_prob ? p : st.z(val[j]);
    if (bias != nullptr) score += bias[j];
    sel[j] = routing_value(score);
  }
  return st;
}
}  // namespace

template <typename T>
void forward_cpu(const RouterOptions& opt, const ForwardArgs<T>& a, int num_threads) {
  const int n = opt.num_experts;
  const int k = opt.top_k;
  const int workers = choose_workers(a.tokens, num_threads, kTokensPerWorker);
  std::vector<std::vector<T>> prob(workers, std::vector<T>(a.prob_partials != nullptr ? n : 0, T(0)));
  std::vector<std::vector<int64_t>> counts(workers, std::vector<int64_t>(n, 0));
  const int ld = (n + kLanes - 1) / kLanes * kLanes;
  std::vector<T> gt(a.G != nullptr ? static_cast<size_t>(n) * ld : 0, T(0));
  for (int j = 0; a.G != nullptr && j < n; ++j) {
    for (int m = 0; m < n; ++m) gt[static_cast<size_t>(m) * ld + j] = a.G[static_cast<int64_t>(j) * n + m];
  }
  parallel_for(a.tokens, workers, [&](int w, int64_t begin, int64_t end) {
    std::vector<T> sel(n), acc(a.G != nullptr ? ld : 0), routed(a.G != nullptr && a.logits_out == nullptr ? n : 0);
    int32_t ids[kMaxTopK];
    T gates[kMaxTopK];
    T* prob_acc = a.prob_partials != nullptr ? prob[w].data() : nullptr;
    for (int64_t t = begin; t < end; ++t) {
      const T* logits = a.logits + t * n;
      if (a.G != nullptr) {  // l' first, then route it as logits without a residual: the same values
        T* out = a.logits_out != nullptr ? a.logits_out + t * n : routed.data();
        add_residual(n, ld, logits, a.prev + t * n, gt.data(), acc.data(), out);
        logits = out;
      }
      const SoftmaxStats<T> st = route_scores_row(opt, logits, a.bias, sel.data(), prob_acc);
      select_top_k_cpu(n, k, sel.data(), ids);
      route_weights(opt, st, logits, ids, gates);
      for (int s = 0; s < k; ++s) {
        a.ids[t * k + s] = ids[s];
        a.weights[t * k + s] = gates[s];
        ++counts[w][ids[s]];
      }
    }
  });
  for (int j = 0; j < n; ++j) {
    int64_t c = 0;
    T p = 0;
    for (int w = 0; w < workers; ++w) {
      c += counts[w][j];
      if (a.prob_partials != nullptr) p += prob[w][j];
    }
    a.counts[j] = static_cast<int32_t>(c);
    if (a.prob_partials != nullptr) a.prob_partials[j] = p;
  }
}

template <typename T>
void backward_cpu(const RouterOptions& opt, const BackwardArgs<T>& a, int num_threads) {
  const int n = opt.num_experts;
  const int k = opt.top_k;
  const int workers = choose_workers(a.tokens, num_threads, kTokensPerWorker);
  parallel_for(a.tokens, workers, [&](int, int64_t begin, int64_t end) {
    std::vector<T> buf(n);
    for (int64_t t = begin; t < end; ++t) {
      T* grad_logits = a.grad_logits + t * n;
      route_token_backward(SerialGroup{}, opt, a.ids + t * k, a.grad_weights ? a.grad_weights + t * k : nullptr,
                           a.grad_logits_out ? a.grad_logits_out + t * n : nullptr, a.grad_prob_sum,
                           static_cast<const T*>(nullptr), n, grad_logits, static_cast<T*>(nullptr),
                           a.routed + t * n, buf.data());
      if (a.grad_prev != nullptr) residual_backward(n, grad_logits, a.G, a.grad_prev + t * n);
    }
  });
}

template void forward_cpu<float>(const RouterOptions&, const ForwardArgs<float>&, int);
template void forward_cpu<double>(const RouterOptions&, const ForwardArgs<double>&, int);
template void backward_cpu<float>(const RouterOptions&, const BackwardArgs<float>&, int);
template void backward_cpu<double>(const RouterOptions&, const BackwardArgs<double>&, int);

}  // namespace moepp::router
