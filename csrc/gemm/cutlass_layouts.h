// Shared by the sm90 and sm80 families: the operand layouts of the three grouped
// products in CUTLASS's terms (A is M x K, B is K x N: ColumnMajor B = the
// weights' [N, K] rows), and the carving of the argument arrays from the workspace.
#pragma once

#include <cstdint>

#include "cutlass/layout/matrix.h"
#include "grouped_gemm.h"

namespace moepp::gemm {

inline int64_t align256(int64_t bytes) { return (bytes + 255) / 256 * 256; }

// Hands out 256-byte aligned arrays of `groups` elements from the start of a
// workspace (a null base only measures: `at` ends as the bytes taken).
struct Carver {
  char* base;
  int groups;
  int64_t at = 0;
  template <typename T>
  T* take() {
    T* p = reinterpret_cast<T*>(base + at);
    at += align256(static_cast<int64_t>(sizeof(T)) * groups);
    return p;
  }
};

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
