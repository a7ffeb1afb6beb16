// The CUTLASS kernel families, one translation unit each (arch x product x
// dtype), as plain functions so the dispatcher does not parse CUTLASS.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#define MOEPP_CUTLASS_FAMILY(NAME)                                                                            \
  int64_t NAME##_workspace(int groups, int device);                                                           \
  void NAME##_run(bool small, int groups, const int32_t* offsets, int64_t rows, int32_t n, int32_t k,         \
                  const void* a, const void* b, void* d, char* workspace, int device, cudaStream_t stream);
#define MOEPP_CUTLASS_FAMILIES      \
  MOEPP_CUTLASS_FAMILY(forward_bf16)     \
  MOEPP_CUTLASS_FAMILY(forward_fp16)     \
  MOEPP_CUTLASS_FAMILY(grad_input_bf16)  \
  MOEPP_CUTLASS_FAMILY(grad_input_fp16)  \
  MOEPP_CUTLASS_FAMILY(grad_weight_bf16) \
  MOEPP_CUTLASS_FAMILY(grad_weight_fp16)

namespace moepp::gemm::sm90 {
MOEPP_CUTLASS_FAMILIES
}  // namespace moepp::gemm::sm90

namespace moepp::gemm::sm80 {
MOEPP_CUTLASS_FAMILIES
}  // namespace moepp::gemm::sm80
#undef MOEPP_CUTLASS_FAMILIES
#undef MOEPP_CUTLASS_FAMILY

// Defines one family's two functions in its translation unit (ARCH: sm90 or sm80).
#define MOEPP_DEFINE_CUTLASS_FAMILY(ARCH, NAME, ELEMENT, PRODUCT)                                               \
  namespace moepp::gemm::ARCH {                                                                               \
  int64_t NAME##_workspace(int groups, int device) {                                                          \
    return Family<ELEMENT, PRODUCT>::workspace_bytes(groups, device);                                         \
  }                                                                                                           \
  void NAME##_run(bool small, int groups, const int32_t* offsets, int64_t rows, int32_t n, int32_t k,         \
                  const void* a, const void* b, void* d, char* workspace, int device, cudaStream_t stream) {   \
    Family<ELEMENT, PRODUCT>::run(small, groups, offsets, rows, n, k, a, b, d, workspace, device, stream);    \
  }                                                                                                           \
  }
