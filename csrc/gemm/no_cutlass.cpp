// Built instead of the CUTLASS kernels when they are not compiled (no CUDA, no
// CUTLASS headers, or neither 90a nor 80 in MOEPP_CUDA_ARCHS).
#include <stdexcept>

#include "grouped_gemm_impl.h"

namespace moepp::gemm {

namespace {
[[noreturn]] void no_cutlass() {
  throw std::runtime_error(
      "moepp_kernels was built without the CUTLASS kernels (needs nvcc, the nvidia-cutlass headers and 90a or 80 "
      "in MOEPP_CUDA_ARCHS)");
}
}  // namespace

int64_t workspace_bytes_cuda(Product, DType, int, int) { no_cutlass(); }
void grouped_gemm_cuda(const CudaCall&) { no_cutlass(); }

}  // namespace moepp::gemm
