// CPU twin of the fused router: the per-token math of router_math.h run by one
// thread per token range.
#include <algorithm>
#include <vector>

#include "../parallel.h"
#include "router.h"

namespace moepp::router {

namespace {
constexpr int64_t kTokensPerWorker = 512;
}

template <typename T>
void forward_cpu(const RouterOptions& opt, const ForwardArgs<T>& a, int num_threads) {
  const int n = opt.num_experts;
  const int k = opt.top_k;
  const int workers = choose_workers(a.tokens, num_threads, kTokensPerWorker);
  std::vector<std::vector<T>> prob(workers, std::vector<T>(a.prob_partials != nullptr ? n : 0, T(0)));
  std::vector<std::vector<int64_t>> counts(workers, std::vector<int64_t>(n, 0));
  parallel_for(a.tokens, workers, [&](int w, int64_t begin, int64_t end) {
    std::vector<T> val(n), sel(n);
    int32_t ids[kMaxTopK];
    T gates[kMaxTopK];
    T* prob_acc = a.prob_partials != nullptr ? prob[w].data() : nullptr;
    for (int64_t t = begin; t < end; ++t) {
      if (a.G != nullptr) std::copy(a.prev + t * n, a.prev + (t + 1) * n, sel.begin());
      T* out = a.logits_out != nullptr ? a.logits_out + t * n : nullptr;
      route_token(SerialGroup{}, opt, a.logits + t * n, a.G, n, a.bias, out, val.data(), sel.data(), prob_acc, ids,
                  gates);
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
      route_token_backward(SerialGroup{}, opt, a.ids + t * k, a.grad_weights ? a.grad_weights + t * k : nullptr,
                           a.grad_logits_out ? a.grad_logits_out + t * n : nullptr, a.grad_prob_sum, a.G, n,
                           a.grad_logits + t * n, a.grad_prev ? a.grad_prev + t * n : nullptr, a.routed + t * n,
                           buf.data());
    }
  });
}

template void forward_cpu<float>(const RouterOptions&, const ForwardArgs<float>&, int);
template void forward_cpu<double>(const RouterOptions&, const ForwardArgs<double>&, int);
template void backward_cpu<float>(const RouterOptions&, const BackwardArgs<float>&, int);
template void backward_cpu<double>(const RouterOptions&, const BackwardArgs<double>&, int);

}  // namespace moepp::router
