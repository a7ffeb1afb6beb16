// Grouped GEMMs over the permutation plan's expert-sorted rows (CUTLASS sm90 / sm80),
// one problem per expert, with the per-expert shapes, pointers and strides
// written on the device from the plan's offsets (no host sync).
//
//   forward      D[R, N]    = A[R, K] · W_gᵀ     A rows of the plan, W [G, N, K]
//   grad_input   D[R, K]    = A[R, N] · W_g      A = dY rows,         W [G, N, K]
//   grad_weight  D[G, N, K] = A_gᵀ · B_g         A = dY [R, N],       B = X [R, K] rows
#pragma once

#include <cstdint>
#include <vector>

#include "../macros.h"
#include "../tensor_view.h"

namespace moepp::gemm {

enum class Product : int32_t { kForward = 0, kGradInput = 1, kGradWeight = 2 };

// One expert's problem (m, n, k) and where its operands start (in elements).
// m_extent is the M its operands are laid out with (the leading dimension of a
// column-major A): m itself, except for an expert without rows in grad_weight,
// whose m is 0 so that CUTLASS schedules no tile for it (a tile of an empty
// reduction would store uninitialised accumulators, and the sm80 prologue would
// read rows past the expert); its zeros come from zero_empty_groups instead.
struct GroupProblem {
  int32_t m, n, k, m_extent;
  int64_t a_offset, b_offset, d_offset;
};

// Shared by the CUDA argument-filling kernel and the CPU test of it. n and k are
// the product's full extents: forward (N, K), grad_input (K, N), grad_weight (N, K);
// `buffer_rows` is the operands' row count. The offsets are read with any value in
// them (moe/indices.h): clamped into [0, buffer_rows], each group ending no earlier
// than it starts, so a malformed plan gives empty or wrong groups, never rows
// outside the operands.
MOEPP_HD GroupProblem group_problem(Product product, int g, const int32_t* offsets, int64_t buffer_rows, int32_t n,
                                    int32_t k) {
  const int64_t first = offsets[g] < 0 ? 0 : (offsets[g] > buffer_rows ? buffer_rows : offsets[g]);
  const int64_t end = offsets[g + 1] < first ? first : (offsets[g + 1] > buffer_rows ? buffer_rows : offsets[g + 1]);
  const int32_t rows = static_cast<int32_t>(end - first);
  switch (product) {
    case Product::kForward:  // D rows = A rows · W_gᵀ: reduction over K
      return {rows, n, k, rows, first * k, int64_t(g) * n * k, first * n};
    case Product::kGradInput:  // D [rows, n] = dY [rows, k] · W_g [k, n]: reduction over the weights' rows
      return {rows, n, k, rows, first * k, int64_t(g) * n * k, first * n};
    default:  // grad_weight: D_g [n, k] = dY_gᵀ [n, rows] · X_g [rows, k]: reduction over the expert's rows
      return {rows > 0 ? n : 0, k, rows, n, first * n, first * k, int64_t(g) * n * k};
  }
}

// The architectures (90, 80) whose CUTLASS families this build compiled.
std::vector<int> cutlass_archs();

// CPU view of what the device kernel writes, for tests: one GroupProblem per expert.
std::vector<GroupProblem> group_problems(Product product, const TensorView& offsets, int64_t buffer_rows, int32_t n,
                                         int32_t k);

// Bytes of device workspace a call needs (argument arrays + CUTLASS's own).
int64_t workspace_bytes(Product product, DType dtype, int groups, int device);

// D = product(A, B) for the plan's groups; `workspace` holds workspace_bytes(...) bytes.
void grouped_gemm(Product product, const TensorView& a, const TensorView& b, const TensorView& d,
                  const TensorView& offsets, const TensorView& workspace, uintptr_t stream);

}  // namespace moepp::gemm
