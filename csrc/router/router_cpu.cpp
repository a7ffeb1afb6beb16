// CPU twin of the fused router: the per-token math of router_math.h run by one
// thread per token range.
#include <algorithm>
#include <vector>

#include "../parallel.h"
#include "router.h"

namespace moepp::router {

namespace {
constexpr int64_t kTokensPerWorker = 512;

// select_top_k for one thread in one pass: a best-first list of k kept by
// insertion. An entry enters only by beating the k-th strictly, and entries come
// in id order, so equal scores keep the lowest ids first, as `better` orders
// them (scores are never NaN here). O(N + k * insertions) instead of O(k * N).
template <typename T>
void select_top_k_serial(int n, int k, const T* score, int32_t* ids) {
  T best[kMaxTopK];
  int count = 0;
  for (int j = 0; j < n; ++j) {
    const T s = score[j];
    if (count == k && !(s > best[k - 1])) continue;
    int pos = count < k ? count++ : k - 1;
    while (pos > 0 && s > best[pos - 1]) {
      best[pos] = best[pos - 1];
      ids[pos] = ids[pos - 1];
      --pos;
    }
    best[pos] = s;
    ids[pos] = j;
  }
}

// l + r·Gᵀ for one token with G transposed (gt[m * n + j] = G[j][m]): the loop
// over j is contiguous and vectorises, and each sum still adds its terms in m
// order from 0, as route_scores does, so the bits are the same.
template <typename T>
void add_residual(int n, const T* logits, const T* r, const T* gt, T* acc, T* out) {
  std::fill(acc, acc + n, T(0));
  for (int m = 0; m < n; ++m) {
    const T rm = r[m];
    const T* row = gt + static_cast<int64_t>(m) * n;
    for (int j = 0; j < n; ++j) acc[j] += rm * row[j];
  }
  for (int j = 0; j < n; ++j) out[j] = logits[j] + acc[j];
}
}  // namespace

template <typename T>
void forward_cpu(const RouterOptions& opt, const ForwardArgs<T>& a, int num_threads) {
  const int n = opt.num_experts;
  const int k = opt.top_k;
  const int workers = choose_workers(a.tokens, num_threads, kTokensPerWorker);
  std::vector<std::vector<T>> prob(workers, std::vector<T>(a.prob_partials != nullptr ? n : 0, T(0)));
  std::vector<std::vector<int64_t>> counts(workers, std::vector<int64_t>(n, 0));
  std::vector<T> gt(a.G != nullptr ? static_cast<size_t>(n) * n : 0);
  for (int j = 0; a.G != nullptr && j < n; ++j) {
    for (int m = 0; m < n; ++m) gt[static_cast<size_t>(m) * n + j] = a.G[static_cast<int64_t>(j) * n + m];
  }
  parallel_for(a.tokens, workers, [&](int w, int64_t begin, int64_t end) {
    std::vector<T> val(n), sel(n), routed(a.G != nullptr ? n : 0);
    int32_t ids[kMaxTopK];
    T gates[kMaxTopK];
    T* prob_acc = a.prob_partials != nullptr ? prob[w].data() : nullptr;
    for (int64_t t = begin; t < end; ++t) {
      const T* logits = a.logits + t * n;
      if (a.G != nullptr) {  // l' first, then route it as logits without a residual: the same values
        add_residual(n, logits, a.prev + t * n, gt.data(), sel.data(), routed.data());
        logits = routed.data();
      }
      T* out = a.logits_out != nullptr ? a.logits_out + t * n : nullptr;
      const SoftmaxStats<T> st =
          route_scores(SerialGroup{}, opt, logits, static_cast<const T*>(nullptr), n, a.bias, out, val.data(),
                       sel.data(), prob_acc);
      select_top_k_serial(n, k, sel.data(), ids);
      route_weights(opt, st, val.data(), ids, gates);
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
      if (a.grad_prev != nullptr) {
        // dL/dr = dl'·G, each sum over j in order from 0 as route_token_backward adds it;
        // G's rows are contiguous in m, so the loop over m vectorises.
        T* grad_prev = a.grad_prev + t * n;
        std::fill(grad_prev, grad_prev + n, T(0));
        for (int j = 0; j < n; ++j) {
          const T dj = grad_logits[j];
          const T* row = a.G + static_cast<int64_t>(j) * n;
          for (int m = 0; m < n; ++m) grad_prev[m] += dj * row[m];
        }
      }
    }
  });
}

template void forward_cpu<float>(const RouterOptions&, const ForwardArgs<float>&, int);
template void forward_cpu<double>(const RouterOptions&, const ForwardArgs<double>&, int);
template void backward_cpu<float>(const RouterOptions&, const BackwardArgs<float>&, int);
template void backward_cpu<double>(const RouterOptions&, const BackwardArgs<double>&, int);

}  // namespace moepp::router
