// Built instead of the CUTLASS kernels when they are not compiled (no CUDA, no
// CUTLASS headers, or no sm_90a in MOEPP_CUDA_ARCHS).
#include <stdexcept>

#include "grouped_gemm_impl.h"

namespace moepp::gemm {

namespace {
[[noreturn]] void no_cutlass() {
  throw std::runtime_error(
      "moepp_kernels was built without the CUTLASS sm_90a kernels (needs nvcc, the nvidia-cutlass headers and "
      "90a in MOEPP_CUDA_ARCHS)");
}
}  // namespace

int64_t workspace_bytes_cuda(Product, DType, int, int) { no_cutlass(); }
void grouped_gemm_cuda(const CudaCall&) { no_cutlass(); }

}  // namespace moepp::gemm
