// The combine epilogue (forward) and its backward: one pass per token over the
// hidden dim, fp32 accumulation, one write in the model dtype.
#pragma once

#include <cstdint>

#include "../tensor_view.h"
#include "combine_math.h"

namespace moepp::moe {

template <typename T>
struct CombineArgs {
  int64_t tokens = 0, dim = 0;
  int k = 0, n_constant = 0;
  ExpertLayout layout{};
  float scale = 1.0f;              // x_e = scale * x (the x*k flag)
  const T* x = nullptr;            // [T, D]
  const T* y = nullptr;            // [T * k, D] FFN outputs by permuted row
  const int32_t* ids = nullptr;    // [T, k]
  const float* weights = nullptr;  // [T, k]
  const int32_t* slot_row = nullptr;
  const float* mix = nullptr;      // [T, 2C] fp32 x_e · W_cᵀ
  const T* const_value = nullptr;  // [C, D]
  T* out = nullptr;                // [T, D]
  // backward only
  const T* dout = nullptr;         // [T, D]
  T* dy = nullptr;                 // [T * k, D]
  T* dx = nullptr;                 // [T, D] through copy / constant slots
  float* dweights = nullptr;       // [T, k]
  float* dmix = nullptr;           // [T, 2C]
  float* v_coef = nullptr;         // [T, C]
};

template <typename T>
void combine_cpu(const CombineArgs<T>& a, int num_threads);
template <typename T>
void combine_backward_cpu(const CombineArgs<T>& a, int num_threads);
template <typename T>
void combine_cuda(const CombineArgs<T>& a, int device, uintptr_t stream);
template <typename T>
void combine_backward_cuda(const CombineArgs<T>& a, int device, uintptr_t stream);

struct CombineViews {
  TensorView x, y, ids, weights, slot_row, mix, const_value;
};

void combine_forward(const CombineViews& in, const ExpertLayout& layout, float scale, const TensorView& out,
                     int num_threads, uintptr_t stream);
// dy's rows that no FFN slot reads must hold 0 on return: the CPU twin writes them; on CUDA the
// caller zeroes dy first (a memset), and the kernel writes the rows slots read.
void combine_backward(const CombineViews& in, const ExpertLayout& layout, float scale, const TensorView& dout,
                      const TensorView& dy, const TensorView& dx, const TensorView& dweights, const TensorView& dmix,
                      const TensorView& v_coef, int num_threads, uintptr_t stream);

}  // namespace moepp::moe
