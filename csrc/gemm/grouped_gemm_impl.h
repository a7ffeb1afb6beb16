// Internal: what grouped_gemm.cpp hands to the CUDA dispatcher after validating.
#pragma once

#include <cstdint>

#include "grouped_gemm.h"

namespace moepp::gemm {

struct CudaCall {
  Product product;
  DType dtype;
  int groups;
  int64_t rows;
  int32_t n, k;  // the product's extents as group_problem() takes them
  const int32_t* offsets;
  const void* a;
  const void* b;
  void* d;
  char* workspace;
  int device;
  uintptr_t stream;
};

int64_t workspace_bytes_cuda(Product product, DType dtype, int groups, int device);
void grouped_gemm_cuda(const CudaCall& call);

}  // namespace moepp::gemm
