// Per-token routing math shared by the CPU loop and the CUDA kernel
// (spec: moepp-semantics.md, "Router"). Every function works on one token and
// is written against a `Group`: the threads that cooperate on that token.
// Element j of the token belongs to member j % Group::kSize; reductions and
// barriers go through the group. On the CPU the group is one thread
// (SerialGroup); the CUDA kernel uses a slice of a warp (ButterflyGroup), which
// a test-only CPU team of threads also runs (router_lanes.cpp).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "../macros.h"
#include "../numeric.h"

namespace moepp::router {

constexpr int kMaxTopK = 16;
constexpr int kMaxExperts = 1024;

enum class Gating : int32_t { kSoftmaxTopK = 0, kTopKSoftmax = 1 };

struct RouterOptions {
  int32_t num_experts = 1;
  int32_t top_k = 1;
  int32_t copy_begin = 0;  // experts [copy_begin, copy_end) are copy (identity) experts
  int32_t copy_end = 0;
  int32_t zero_begin = 1;  // experts [zero_begin, num_experts) are zero experts
  Gating gating = Gating::kSoftmaxTopK;
  bool normalize = false;  // logits normalisation to target std `sigma`
  double sigma = 1.0;       // target std (double: an fp64 router sees the exact value)
  bool renormalize = true;  // softmax_topk: divide the k gates by their sum
  double scaling = 1.0;     // routed scaling factor
  bool scale_identity = true;
};

template <typename T>
MOEPP_HD bool is_nan(T v) { return v != v; }

template <typename T>
MOEPP_HD T neg_inf() { return -std::numeric_limits<T>::infinity(); }

template <typename T>
MOEPP_HD T pos_inf() { return std::numeric_limits<T>::infinity(); }

// NaN takes part in routing as -inf: never preferred to a real value.
template <typename T>
MOEPP_HD T routing_value(T v) { return is_nan(v) ? neg_inf<T>() : v; }

// e^x of the router's softmax: exp_approx in fp32 (the same on the CPU and the GPU, and
// vectorising in the CPU row loops), libm's in fp64 (gradcheck's precision). Its x is
// always z - max <= 0 (or NaN), so the overflow's clamp is left out.
MOEPP_HD float softmax_exp(float x) { return exp_approx<true>(x); }
MOEPP_HD double softmax_exp(double x) { return std::exp(x); }

// A top-k candidate; a NaN score marks "already taken / none".
template <typename T>
struct Candidate {
  T score;
  int32_t id;
};

// Ties go to the lowest expert id (spec: Router, step 4).
template <typename T>
MOEPP_HD bool better(const Candidate<T>& a, const Candidate<T>& b) {
  if (is_nan(a.score)) return false;
  if (is_nan(b.score)) return true;
  return a.score > b.score || (a.score == b.score && a.id < b.id);
}

struct SerialGroup {
  static constexpr int kSize = 1;
  MOEPP_HD int rank() const { return 0; }
  template <typename T>
  MOEPP_HD T sum(T v) const { return v; }
  template <typename T>
  MOEPP_HD T max(T v) const { return v; }
  template <typename T>
  MOEPP_HD Candidate<T> best(Candidate<T> c) const { return c; }
  MOEPP_HD void sync() const {}
};

// LANES members (a power of two) that exchange values through `Exchange`, as the
// lanes of a warp slice do with __shfl_xor_sync (the CUDA kernel), or as the
// threads of the CPU test team do (router_lanes.cpp). Reductions are butterflies:
// every member ends with the same bits, added in the order the GPU adds them.
// Exchange provides rank(), shfl_xor(v, offset) and sync().
template <int LANES, class Exchange>
struct ButterflyGroup {
  static constexpr int kSize = LANES;
  Exchange ex;
  MOEPP_HD int rank() const { return ex.rank(); }
  template <typename T>
  MOEPP_HD T sum(T v) const {
    for (int offset = LANES / 2; offset > 0; offset /= 2) v += ex.shfl_xor(v, offset);
    return v;
  }
  template <typename T>
  MOEPP_HD T max(T v) const {
    for (int offset = LANES / 2; offset > 0; offset /= 2) {
      const T other = ex.shfl_xor(v, offset);
      v = other > v ? other : v;
    }
    return v;
  }
  template <typename T>
  MOEPP_HD Candidate<T> best(Candidate<T> c) const {
    for (int offset = LANES / 2; offset > 0; offset /= 2) {
      const Candidate<T> other{ex.shfl_xor(c.score, offset), ex.shfl_xor(c.id, offset)};
      if (better(other, c)) c = other;
    }
    return c;
  }
  MOEPP_HD void sync() const { ex.sync(); }
};

// Row statistics from which z (normalised logits) and p = softmax(z) follow.
template <typename T>
struct SoftmaxStats {
  T mean;
  T var;
  T scale;  // z = l * scale; 1 when normalisation is off or skipped
  bool normalized;
  T max_z;    // max of routing_value(z)
  T sum_exp;  // sum of exp(z - max_z) when max_z is finite
  T n_pos_inf;

  MOEPP_HD T z(T l) const { return routing_value(l * scale); }
  // softmax with the limits the spec asks for: a row without any finite or
  // +inf value has p = 0; +inf entries share the mass equally.
  MOEPP_HD T prob(T l) const {
    const T zl = z(l);
    if (max_z == neg_inf<T>()) return T(0);
    if (max_z == pos_inf<T>()) return zl == pos_inf<T>() ? T(1) / n_pos_inf : T(0);
    return softmax_exp(zl - max_z) / sum_exp;
  }
  MOEPP_HD bool finite_softmax() const { return max_z != neg_inf<T>() && max_z != pos_inf<T>(); }
};

// `val` holds the routed logits l' of the token. Normalisation is skipped when
// std is 0, not finite (any non-finite logit), N == 1, or sigma/std overflows.
// When `exps` is given, exp(z_j - max_z) is kept there for the owned j (rows
// with a finite maximum), so p_j = exps[j] / sum_exp costs no second exp.
template <class Group, typename T>
MOEPP_HD SoftmaxStats<T> softmax_stats(const Group& g, const RouterOptions& opt, const T* val, T* exps = nullptr) {
  const int n = opt.num_experts;
  SoftmaxStats<T> st{};
  st.scale = T(1);
  st.normalized = false;
  if (opt.normalize && n > 1) {
    T s = 0;
    for (int j = g.rank(); j < n; j += Group::kSize) s += val[j];
    st.mean = g.sum(s) / T(n);
    T ss = 0;
    for (int j = g.rank(); j < n; j += Group::kSize) ss += (val[j] - st.mean) * (val[j] - st.mean);
    st.var = g.sum(ss) / T(n - 1);
    const T stddev = std::sqrt(st.var);
    const T scale = T(opt.sigma) / stddev;
    if (std::isfinite(st.var) && st.var > T(0) && std::isfinite(scale)) {
      st.scale = scale;
      st.normalized = true;
    }
  }
  T m = neg_inf<T>();
  for (int j = g.rank(); j < n; j += Group::kSize) {
    const T zj = st.z(val[j]);
    m = zj > m ? zj : m;
  }
  st.max_z = g.max(m);
  T acc = 0;
  for (int j = g.rank(); j < n; j += Group::kSize) {
    const T zj = st.z(val[j]);
    if (st.max_z == pos_inf<T>()) {
      acc += zj == pos_inf<T>() ? T(1) : T(0);
    } else if (st.max_z != neg_inf<T>()) {
      const T e = softmax_exp(zj - st.max_z);
      if (exps != nullptr) exps[j] = e;
      acc += e;
    }
  }
  acc = g.sum(acc);
  st.sum_exp = acc;
  st.n_pos_inf = acc;
  return st;
}

MOEPP_HD bool is_zero_expert(const RouterOptions& opt, int32_t id) { return id >= opt.zero_begin; }

template <typename T>
MOEPP_HD T slot_scale(const RouterOptions& opt, int32_t id) {
  const bool identity = id >= opt.copy_begin && id < opt.copy_end;
  return identity && !opt.scale_identity ? T(1) : T(opt.scaling);
}

// Calls f(s) for the slots s < k. The loop runs to the compile-time kMaxTopK and
// is unrolled in device code, so the per-slot arrays of the kernels (ids, gates)
// are indexed by constants and live in registers, not in local memory.
template <typename F>
MOEPP_HD void for_each_slot(int k, F&& f) {
  MOEPP_UNROLL
  for (int s = 0; s < kMaxTopK; ++s) {
    if (s >= k) break;
    f(s);
  }
}

// Gates of the k chosen experts before the routed scaling factor.
// softmax_topk: p of the chosen experts, zero experts masked to 0, divided by
// their sum when renormalising (a sum of 0 gives all-zero gates).
// topk_softmax: softmax over the chosen z values.
template <typename T>
MOEPP_HD void slot_gates(const RouterOptions& opt, const SoftmaxStats<T>& st, const T* val, const int32_t* ids, T* gates) {
  const int k = opt.top_k;
  T total = 0;
  if (opt.gating == Gating::kSoftmaxTopK) {
    for_each_slot(k, [&](int s) {
      gates[s] = is_zero_expert(opt, ids[s]) ? T(0) : st.prob(val[ids[s]]);
      total += gates[s];
    });
    if (!opt.renormalize) return;
  } else {
    T m = neg_inf<T>();
    for_each_slot(k, [&](int s) {
      const T zs = st.z(val[ids[s]]);
      m = zs > m ? zs : m;
    });
    for_each_slot(k, [&](int s) {
      const T zs = st.z(val[ids[s]]);
      if (m == neg_inf<T>()) {
        gates[s] = T(0);
      } else if (m == pos_inf<T>()) {
        gates[s] = zs == pos_inf<T>() ? T(1) : T(0);
      } else {
        gates[s] = softmax_exp(zs - m);
      }
      total += gates[s];
    });
  }
  for_each_slot(k, [&](int s) { gates[s] = total > T(0) ? gates[s] / total : T(0); });
}

// From the statistics of l' in `val` (with a finite softmax, `sel` holds
// exp(z_j - max_z), as softmax_stats leaves it): p_j, added into `prob_acc` when
// given, and the selection score routing_value(p_j or z_j, + bias_j) into `sel`.
template <class Group, typename T>
MOEPP_HD void selection_scores(const Group& g, const RouterOptions& opt, const SoftmaxStats<T>& st, const T* val,
                               const T* bias, T* sel, T* prob_acc) {
  for (int j = g.rank(); j < opt.num_experts; j += Group::kSize) {
    const T pj = st.finite_softmax() ? sel[j] / st.sum_exp : st.prob(val[j]);
    if (prob_acc != nullptr) prob_acc[j] += pj;
    T score = opt.gating == Gating::kSoftmaxTopK ? pj : st.z(val[j]);
    if (bias != nullptr) score += bias[j];
    sel[j] = routing_value(score);
  }
}

// Forward for one token, first part. On entry `val` holds l (or, with a
// residual, the group has staged r in `sel` and `prev_g` points at G with row
// stride ldg). Writes l' = l + r·Gᵀ into `val` (and `logits_out` when given),
// adds p into `prob_acc` when given, leaves the selection scores in `sel`
// (NaN never: NaN scores become -inf) and returns the softmax statistics.
template <class Group, typename T>
MOEPP_HD SoftmaxStats<T> route_scores(const Group& g, const RouterOptions& opt, const T* logits, const T* G,
                                      int64_t ldg, const T* bias, T* logits_out, T* val, T* sel, T* prob_acc) {
  const int n = opt.num_experts;
  for (int j = g.rank(); j < n; j += Group::kSize) {
    T v = logits[j];
    if (G != nullptr) {
      T acc = 0;
      for (int m = 0; m < n; ++m) acc += sel[m] * G[j * ldg + m];
      v += acc;
    }
    val[j] = v;
    if (logits_out != nullptr) logits_out[j] = v;
  }
  g.sync();
  const SoftmaxStats<T> st = softmax_stats(g, opt, val, sel);
  selection_scores(g, opt, st, val, bias, sel, prob_acc);
  return st;
}

// The k best scores of `sel`, ties to the lowest id, best first (k passes of
// the group; taken entries are marked NaN in `sel`).
template <class Group, typename T>
MOEPP_HD void select_top_k(const Group& g, const RouterOptions& opt, T* sel, int32_t* ids) {
  const int n = opt.num_experts;
  for_each_slot(opt.top_k, [&](int s) {
    Candidate<T> c{std::numeric_limits<T>::quiet_NaN(), INT32_MAX};
    for (int j = g.rank(); j < n; j += Group::kSize) {
      const Candidate<T> cj{sel[j], j};
      if (better(cj, c)) c = cj;
    }
    c = g.best(c);
    ids[s] = c.id;
    if (c.id % Group::kSize == g.rank()) sel[c.id] = std::numeric_limits<T>::quiet_NaN();
  });
}

// Forward for one token, last part: the final weights of the chosen ids.
template <typename T>
MOEPP_HD void route_weights(const RouterOptions& opt, const SoftmaxStats<T>& st, const T* val, const int32_t* ids,
                            T* weights) {
  slot_gates(opt, st, val, ids, weights);
  for_each_slot(opt.top_k, [&](int s) { weights[s] *= slot_scale<T>(opt, ids[s]); });
}

// Forward for one token: route_scores, select_top_k, route_weights. Returns the
// chosen ids and final weights (arrays of kMaxTopK, indexed by slot only:
// registers in the kernel).
template <class Group, typename T>
MOEPP_HD void route_token(const Group& g, const RouterOptions& opt, const T* logits, const T* G, int64_t ldg,
                          const T* bias, T* logits_out, T* val, T* sel, T* prob_acc, int32_t* ids, T* weights) {
  const SoftmaxStats<T> st = route_scores(g, opt, logits, G, ldg, bias, logits_out, val, sel, prob_acc);
  select_top_k(g, opt, sel, ids);
  route_weights(opt, st, val, ids, weights);
}

// Backward for one token. `val` must hold l' (the routed logits, staged by the
// group before the call), `buf` is scratch of N. Gradients arrive for the
// final weights, the passed-on logits and the per-expert probability sums
// (each may be null); writes dL/dl' into `grad_logits` and, when G is given,
// dL/dr = dl'·G into `grad_prev`.
template <class Group, typename T>
MOEPP_HD void route_token_backward(const Group& g, const RouterOptions& opt, const int32_t* token_ids,
                                   const T* grad_weights, const T* grad_logits_out, const T* grad_prob_sum, const T* G,
                                   int64_t ldg, T* grad_logits, T* grad_prev, const T* val, T* buf) {
  const int n = opt.num_experts;
  const int k = opt.top_k;
  const SoftmaxStats<T> st = softmax_stats(g, opt, val);

  int32_t ids[kMaxTopK];
  T gates[kMaxTopK];
  T dgate[kMaxTopK];
  for_each_slot(k, [&](int s) { ids[s] = token_ids[s]; });
  slot_gates(opt, st, val, ids, gates);
  for_each_slot(k, [&](int s) {
    dgate[s] = grad_weights != nullptr ? grad_weights[s] * slot_scale<T>(opt, ids[s]) : T(0);
  });
  // dgate becomes the gradient w.r.t. p[ids[s]] (softmax_topk) or z[ids[s]] (topk_softmax).
  T dot = 0;
  for_each_slot(k, [&](int s) { dot += dgate[s] * gates[s]; });
  if (opt.gating == Gating::kSoftmaxTopK) {
    if (opt.renormalize) {
      T raw_total = 0;
      for_each_slot(k, [&](int s) { raw_total += is_zero_expert(opt, ids[s]) ? T(0) : st.prob(val[ids[s]]); });
      for_each_slot(k, [&](int s) { dgate[s] = raw_total > T(0) ? (dgate[s] - dot) / raw_total : T(0); });
    }
    for_each_slot(k, [&](int s) {
      if (is_zero_expert(opt, ids[s])) dgate[s] = T(0);
    });
  } else {
    for_each_slot(k, [&](int s) { dgate[s] = gates[s] * (dgate[s] - dot); });
  }

  const bool by_prob = opt.gating == Gating::kSoftmaxTopK;
  for (int j = g.rank(); j < n; j += Group::kSize) buf[j] = grad_prob_sum != nullptr ? grad_prob_sum[j] : T(0);
  if (by_prob) {
    for_each_slot(k, [&](int s) {
      if (ids[s] % Group::kSize == g.rank()) buf[ids[s]] += dgate[s];
    });
  }
  // Softmax backward: dz = p * (dp - sum(p * dp)); 0 where the softmax is a
  // constant (rows without a finite maximum).
  T pdot = 0;
  for (int j = g.rank(); j < n; j += Group::kSize) pdot += st.prob(val[j]) * buf[j];
  pdot = g.sum(pdot);
  for (int j = g.rank(); j < n; j += Group::kSize) {
    buf[j] = st.finite_softmax() ? st.prob(val[j]) * (buf[j] - pdot) : T(0);
  }
  if (!by_prob) {
    for_each_slot(k, [&](int s) {
      if (ids[s] % Group::kSize == g.rank() && std::isfinite(st.z(val[ids[s]]))) buf[ids[s]] += dgate[s];
    });
  }
  // Normalisation backward: z = l' * sigma / std(l').
  T zdot = 0;
  if (st.normalized) {
    for (int j = g.rank(); j < n; j += Group::kSize) zdot += buf[j] * val[j];
    zdot = g.sum(zdot);
  }
  const T coef = st.normalized ? st.scale / (st.var * T(n - 1)) : T(0);
  for (int j = g.rank(); j < n; j += Group::kSize) {
    T d = st.normalized ? st.scale * buf[j] - coef * (val[j] - st.mean) * zdot : buf[j];
    if (grad_logits_out != nullptr) d += grad_logits_out[j];
    buf[j] = d;
    grad_logits[j] = d;
  }
  if (grad_prev != nullptr) {
    g.sync();
    for (int m = g.rank(); m < n; m += Group::kSize) {
      T acc = 0;
      for (int j = 0; j < n; ++j) acc += buf[j] * G[j * ldg + m];
      grad_prev[m] = acc;
    }
  }
}

}  // namespace moepp::router
