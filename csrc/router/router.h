// The fused top-k router: entry points taking tensor views (validated here)
// and the CPU / CUDA implementations taking raw pointers.
#pragma once

#include <cstdint>
#include <optional>

#include "../tensor_view.h"
#include "router_math.h"

namespace moepp::router {

// All tensors are contiguous; T tokens, N experts, k slots per token.
template <typename T>
struct ForwardArgs {
  int64_t tokens = 0;
  const T* logits = nullptr;      // [T, N]
  const T* prev = nullptr;        // [T, N] or null (first layer)
  const T* G = nullptr;           // [N, N], given with prev
  const T* bias = nullptr;        // [N] selection bias or null
  int32_t* ids = nullptr;         // [T, k]
  T* weights = nullptr;           // [T, k]
  T* logits_out = nullptr;        // [T, N] l + r·Gᵀ, given with prev
  int32_t* counts = nullptr;      // [N], zero on entry
  T* prob_partials = nullptr;     // [partial_rows, N] or null: per-block sums of p
};

template <typename T>
struct BackwardArgs {
  int64_t tokens = 0;
  const T* routed = nullptr;           // [T, N] l' saved by the forward
  const int32_t* ids = nullptr;        // [T, k]
  const T* grad_weights = nullptr;     // [T, k] or null
  const T* grad_logits_out = nullptr;  // [T, N] or null
  const T* grad_prob_sum = nullptr;    // [N] or null
  const T* G = nullptr;                // [N, N] or null
  T* grad_logits = nullptr;            // [T, N]
  T* grad_prev = nullptr;              // [T, N], given with G
};

template <typename T>
void forward_cpu(const RouterOptions& opt, const ForwardArgs<T>& args, int num_threads);
template <typename T>
void backward_cpu(const RouterOptions& opt, const BackwardArgs<T>& args, int num_threads);
template <typename T>
void forward_cuda(const RouterOptions& opt, const ForwardArgs<T>& args, int device, uintptr_t stream);
template <typename T>
void backward_cuda(const RouterOptions& opt, const BackwardArgs<T>& args, int device, uintptr_t stream);
int64_t cuda_partial_rows(int64_t tokens, int num_experts);
// Test-only: the CUDA kernels' per-token execution by `lanes` CPU threads sharing
// one token, as a warp slice does (router_lanes.cpp).
template <typename T>
void forward_lanes(int lanes, const RouterOptions& opt, const ForwardArgs<T>& args);
template <typename T>
void backward_lanes(int lanes, const RouterOptions& opt, const BackwardArgs<T>& args);

void validate_options(const RouterOptions& opt);

// Rows of the per-block probability sums the forward writes (sum them for P).
// forward / backward: cpu_lanes > 0 runs CPU tensors through forward_lanes /
// backward_lanes instead of the CPU twin (tests only).
int64_t partial_rows(int64_t tokens, int num_experts, DeviceType device);

void forward(const RouterOptions& opt, const TensorView& logits, const std::optional<TensorView>& prev,
             const std::optional<TensorView>& residual_weight, const std::optional<TensorView>& bias,
             const TensorView& ids, const TensorView& weights, const std::optional<TensorView>& logits_out,
             const TensorView& counts, const std::optional<TensorView>& prob_partials, int num_threads,
             uintptr_t stream, int cpu_lanes = 0);

void backward(const RouterOptions& opt, const TensorView& routed, const TensorView& ids,
              const std::optional<TensorView>& grad_weights, const std::optional<TensorView>& grad_logits_out,
              const std::optional<TensorView>& grad_prob_sum, const std::optional<TensorView>& residual_weight,
              const TensorView& grad_logits, const std::optional<TensorView>& grad_prev, int num_threads,
              uintptr_t stream, int cpu_lanes = 0);

}  // namespace moepp::router
