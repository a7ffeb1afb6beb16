// The FFN path's memory-bound kernels around the grouped GEMMs:
//   gather      xg[r] = scale * x[token(r)]             (rows of the plan; x*k folded in)
//   swiglu      a[r] = silu(h[r, :I]) * h[r, I:]
//   swiglu_bwd  dh[r] from da[r], and a[r] recomputed (saved h only)
//   row_sum     out[t] = scale * sum over t's FFN slots of src[slot_row[t, j]]
// Rows r >= offsets[n_ffn] (the plan's total, read on the device) are skipped.
#pragma once

#include <cstdint>

#include "../tensor_view.h"

namespace moepp::moe {

void gather_rows(const TensorView& x, const TensorView& row_src, const TensorView& offsets, int top_k, float scale,
                 const TensorView& out, int num_threads, uintptr_t stream);
void swiglu_forward(const TensorView& h, const TensorView& offsets, const TensorView& a, int num_threads,
                    uintptr_t stream);
void swiglu_backward(const TensorView& h, const TensorView& da, const TensorView& offsets, const TensorView& dh,
                     const TensorView& a, int num_threads, uintptr_t stream);
void row_sum(const TensorView& src, const TensorView& slot_row, float scale, const TensorView& out, int num_threads,
             uintptr_t stream);

// Raw-pointer implementations (CPU twin in ffn_pointwise.cpp, CUDA in ffn_pointwise_cuda.cu).
template <typename T>
struct GatherArgs {
  const T* x;
  const int32_t* row_src;
  const int32_t* total_rows;  // &offsets[n_ffn]
  int64_t rows, dim;
  int64_t tokens;  // x's rows: row_src entries outside [0, tokens * top_k) name no token
  int top_k;
  float scale;
  T* out;
};
template <typename T>
struct SwigluArgs {
  const T* h;
  const T* da;  // null in the forward
  const int32_t* total_rows;
  int64_t rows, inner;  // inner = I; h has 2I columns
  T* dh;                // null in the forward
  T* a;
};
template <typename T>
struct RowSumArgs {
  const T* src;
  const int32_t* slot_row;
  int64_t tokens, dim;
  int top_k;
  float scale;
  T* out;
};

template <typename T>
void gather_rows_cpu(const GatherArgs<T>& a, int num_threads);
template <typename T>
void swiglu_cpu(const SwigluArgs<T>& a, int num_threads);
template <typename T>
void row_sum_cpu(const RowSumArgs<T>& a, int num_threads);
template <typename T>
void gather_rows_cuda(const GatherArgs<T>& a, int device, uintptr_t stream);
template <typename T>
void swiglu_cuda(const SwigluArgs<T>& a, int device, uintptr_t stream);
template <typename T>
void row_sum_cuda(const RowSumArgs<T>& a, int device, uintptr_t stream);

}  // namespace moepp::moe
