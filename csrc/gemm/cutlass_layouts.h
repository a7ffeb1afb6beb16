// Operand layouts of the three grouped products, in CUTLASS's terms (A is M x K,
// B is K x N: ColumnMajor B = the weights' [N, K] rows). Shared by sm90 and sm80.
#pragma once

#include "cutlass/layout/matrix.h"
#include "grouped_gemm.h"

namespace moepp::gemm {

template <Product P>
struct Layouts;
template <>
struct Layouts<Product::kForward> {
  using A = cutlass::layout::RowMajor;
  using B = cutlass::layout::ColumnMajor;
};
template <>
struct Layouts<Product::kGradInput> {
  using A = cutlass::layout::RowMajor;
  using B = cutlass::layout::RowMajor;
};
template <>
struct Layouts<Product::kGradWeight> {
  using A = cutlass::layout::ColumnMajor;
  using B = cutlass::layout::RowMajor;
};

}  // namespace moepp::gemm
