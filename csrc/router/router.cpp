#include "router.h"

#include <cmath>
#include <stdexcept>
#include <string>

#include "../dispatch.h"

namespace moepp::router {

namespace {

template <typename T>
T* data_or_null(const std::optional<TensorView>& view) {
  return view ? view->ptr<T>() : nullptr;
}

}  // namespace

void validate_options(const RouterOptions& opt) {
  const int n = opt.num_experts;
  if (n < 1 || n > kMaxExperts) {
    throw_invalid("num_experts", "must be in [1, " + std::to_string(kMaxExperts) + "], got " + std::to_string(n));
  }
  if (opt.top_k < 1 || opt.top_k > n || opt.top_k > kMaxTopK) {
    throw_invalid("top_k", "must be in [1, min(num_experts, " + std::to_string(kMaxTopK) + ")], got " +
                               std::to_string(opt.top_k));
  }
  if (!(0 <= opt.copy_begin && opt.copy_begin <= opt.copy_end && opt.copy_end <= opt.zero_begin &&
        opt.zero_begin <= n)) {
    throw_invalid("expert layout", "needs 0 <= copy_begin <= copy_end <= zero_begin <= num_experts");
  }
  if (opt.gating != Gating::kSoftmaxTopK && opt.gating != Gating::kTopKSoftmax) {
    throw_invalid("gating", "unknown gating mode");
  }
  if (!(std::isfinite(opt.sigma) && opt.sigma > 0.0)) throw_invalid("sigma", "must be finite and > 0");
  if (!std::isfinite(opt.scaling)) throw_invalid("routed_scaling_factor", "must be finite");
}

int64_t partial_rows(int64_t tokens, int num_experts, DeviceType device) {
  return device == DeviceType::kCUDA ? cuda_partial_rows(tokens, num_experts) : 1;
}

void forward(const RouterOptions& opt, const TensorView& logits, const std::optional<TensorView>& prev,
             const std::optional<TensorView>& residual_weight, const std::optional<TensorView>& bias,
             const TensorView& ids, const TensorView& weights, const std::optional<TensorView>& logits_out,
             const TensorView& counts, const std::optional<TensorView>& prob_partials, int num_threads,
             uintptr_t stream, int cpu_lanes) {
  validate_options(opt);
  const int64_t n = opt.num_experts;
  const int64_t k = opt.top_k;
  if (logits.ndim != 2) throw_invalid("logits", "expected shape [tokens, num_experts]");
  const int64_t tokens = logits.shape[0];
  const DeviceType dev = logits.device;
  const int32_t idx = logits.device_index;
  if (prev.has_value() != residual_weight.has_value()) {
    throw_invalid("prev_logits", "prev_logits and residual_weight must be given together");
  }
  if (prev.has_value() != logits_out.has_value()) throw_invalid("logits_out", "needed exactly when prev_logits is given");
  MOEPP_DISPATCH(logits.dtype, "logits", (float, double), T, {
    const DType dt = DTypeOf<T>::value;
    check_view(logits, "logits", dt, {tokens, n}, dev, idx);
    if (prev) {
      check_view(*prev, "prev_logits", dt, {tokens, n}, dev, idx);
      check_view(*residual_weight, "residual_weight", dt, {n, n}, dev, idx);
      check_view(*logits_out, "logits_out", dt, {tokens, n}, dev, idx);
    }
    if (bias) check_view(*bias, "selection_bias", dt, {n}, dev, idx);
    check_view(ids, "ids", DType::kInt32, {tokens, k}, dev, idx);
    check_view(weights, "weights", dt, {tokens, k}, dev, idx);
    check_view(counts, "counts", DType::kInt32, {n}, dev, idx);
    if (prob_partials) check_view(*prob_partials, "prob_partials", dt, {partial_rows(tokens, n, dev), n}, dev, idx);
    ForwardArgs<T> args;
    args.tokens = tokens;
    args.logits = logits.ptr<T>();
    args.prev = data_or_null<T>(prev);
    args.G = data_or_null<T>(residual_weight);
    args.bias = data_or_null<T>(bias);
    args.ids = ids.ptr<int32_t>();
    args.weights = weights.ptr<T>();
    args.logits_out = data_or_null<T>(logits_out);
    args.counts = counts.ptr<int32_t>();
    args.prob_partials = data_or_null<T>(prob_partials);
    if (dev == DeviceType::kCUDA) {
      forward_cuda<T>(opt, args, idx, stream);
    } else if (cpu_lanes > 0) {
      forward_lanes<T>(cpu_lanes, opt, args);
    } else {
      forward_cpu<T>(opt, args, num_threads);
    }
  });
}

void backward(const RouterOptions& opt, const TensorView& routed, const TensorView& ids,
              const std::optional<TensorView>& grad_weights, const std::optional<TensorView>& grad_logits_out,
              const std::optional<TensorView>& grad_prob_sum, const std::optional<TensorView>& residual_weight,
              const TensorView& grad_logits, const std::optional<TensorView>& grad_prev, int num_threads,
              uintptr_t stream, int cpu_lanes) {
  validate_options(opt);
  const int64_t n = opt.num_experts;
  const int64_t k = opt.top_k;
  if (routed.ndim != 2) throw_invalid("routed_logits", "expected shape [tokens, num_experts]");
  const int64_t tokens = routed.shape[0];
  const DeviceType dev = routed.device;
  const int32_t idx = routed.device_index;
  if (residual_weight.has_value() != grad_prev.has_value()) {
    throw_invalid("grad_prev", "needed exactly when residual_weight is given");
  }
  MOEPP_DISPATCH(routed.dtype, "routed_logits", (float, double), T, {
    const DType dt = DTypeOf<T>::value;
    check_view(routed, "routed_logits", dt, {tokens, n}, dev, idx);
    check_view(ids, "ids", DType::kInt32, {tokens, k}, dev, idx);
    if (grad_weights) check_view(*grad_weights, "grad_weights", dt, {tokens, k}, dev, idx);
    if (grad_logits_out) check_view(*grad_logits_out, "grad_logits_out", dt, {tokens, n}, dev, idx);
    if (grad_prob_sum) check_view(*grad_prob_sum, "grad_prob_sum", dt, {n}, dev, idx);
    if (residual_weight) {
      check_view(*residual_weight, "residual_weight", dt, {n, n}, dev, idx);
      check_view(*grad_prev, "grad_prev", dt, {tokens, n}, dev, idx);
    }
    check_view(grad_logits, "grad_logits", dt, {tokens, n}, dev, idx);
    BackwardArgs<T> args;
    args.tokens = tokens;
    args.routed = routed.ptr<T>();
    args.ids = ids.ptr<int32_t>();
    args.grad_weights = data_or_null<T>(grad_weights);
    args.grad_logits_out = data_or_null<T>(grad_logits_out);
    args.grad_prob_sum = data_or_null<T>(grad_prob_sum);
    args.G = data_or_null<T>(residual_weight);
    args.grad_logits = grad_logits.ptr<T>();
    args.grad_prev = data_or_null<T>(grad_prev);
    if (dev == DeviceType::kCUDA) {
      backward_cuda<T>(opt, args, idx, stream);
    } else if (cpu_lanes > 0) {
      backward_lanes<T>(cpu_lanes, opt, args);
    } else {
      backward_cpu<T>(opt, args, num_threads);
    }
  });
}

}  // namespace moepp::router
