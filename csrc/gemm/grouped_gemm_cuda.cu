// Picks the CUTLASS family for (architecture, product, dtype) and, on sm90, the
// tile configuration for the shape: the small-M (decode) tile when experts
// average <= 64 rows of the buffer.
#include <algorithm>
#include <string>

#include "../cuda/arch_support.h"
#include "../cuda/cuda_utils.h"
#include "cutlass_families.h"
#include "grouped_gemm_impl.h"

namespace moepp::gemm {

namespace {

// The families of one architecture, as (workspace, run) function pairs.
#define MOEPP_FAMILIES_OF(ARCH)                                                                             \
  template <typename F>                                                                                     \
  auto ARCH##_family(Product product, bool bf16, F&& f) {                                                   \
    using namespace ARCH;                                                                                   \
    switch (product) {                                                                                      \
      case Product::kForward:                                                                               \
        return bf16 ? f(forward_bf16_workspace, forward_bf16_run) : f(forward_fp16_workspace, forward_fp16_run); \
      case Product::kGradInput:                                                                             \
        return bf16 ? f(grad_input_bf16_workspace, grad_input_bf16_run)                                     \
                    : f(grad_input_fp16_workspace, grad_input_fp16_run);                                    \
      default:                                                                                              \
        return bf16 ? f(grad_weight_bf16_workspace, grad_weight_bf16_run)                                   \
                    : f(grad_weight_fp16_workspace, grad_weight_fp16_run);                                  \
    }                                                                                                       \
  }
#ifdef MOEPP_WITH_CUTLASS_SM90
MOEPP_FAMILIES_OF(sm90)
#endif
#ifdef MOEPP_WITH_CUTLASS_SM80
MOEPP_FAMILIES_OF(sm80)
#endif
#undef MOEPP_FAMILIES_OF

// The family cutlass_family_for() picks for the device (arch_support.h): sm90 on 9.0,
// sm80 on 8.x (and by PTX JIT on newer GPUs); else a clear error.
template <typename F>
auto by_family(Product product, DType dtype, int device, F&& f) {
  int major = 0, minor = 0;
  cuda::check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "cudaDeviceGetAttribute");
  cuda::check(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device), "cudaDeviceGetAttribute");
  const bool bf16 = dtype == DType::kBFloat16;
  const int family = cuda::cutlass_family_for(major, minor, cutlass_archs());
#ifdef MOEPP_WITH_CUTLASS_SM90
  if (family == 90) return sm90_family(product, bf16, f);
#endif
#ifdef MOEPP_WITH_CUTLASS_SM80
  if (family == 80) return sm80_family(product, bf16, f);
#endif
  throw std::runtime_error("moepp_kernels has no CUTLASS grouped GEMM that runs on compute capability " +
                           std::to_string(major) + "." + std::to_string(minor) +
                           " (the sm90 family needs 9.0; the sm80 family, 8.0 or newer: MOEPP_CUDA_ARCHS)");
}

// An expert without rows has an empty weight-gradient sum: its slice of dW is
// zeroed here, so no kernel has to be trusted with an empty reduction and the
// other experts' slices are written once, by the GEMM.
__global__ void zero_empty_groups(const int32_t* offsets, int64_t group_elems, uint16_t* d) {
  const int g = blockIdx.y;
  if (offsets[g + 1] != offsets[g]) return;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < group_elems; i += int64_t(gridDim.x) * blockDim.x) {
    d[g * group_elems + i] = 0;
  }
}

}  // namespace

int64_t workspace_bytes_cuda(Product product, DType dtype, int groups, int device) {
  cuda::DeviceGuard guard(device);
  return by_family(product, dtype, device, [&](auto workspace, auto) { return workspace(groups, device); });
}

void grouped_gemm_cuda(const CudaCall& c) {
  cuda::DeviceGuard guard(c.device);
  // The tile is picked on the host, before the launch. The rows routed to FFN experts
  // (offsets[groups]) exist only on the device: reading them would cost a host sync per
  // GEMM, the one thing this backend is for avoiding. c.rows is the buffer's T * k, an
  // upper bound; where zero-computation experts take many slots, experts may average
  // <= 64 rows while the bound does not, and the large tile then runs with idle rows
  // in each expert's last M tile (slower decode, same result).
  const bool small = c.product != Product::kGradWeight && c.rows <= 64 * int64_t(c.groups);
  if (c.product == Product::kGradWeight) {  // bf16 / fp16: 16-bit elements
    const int64_t elems = int64_t(c.n) * c.k;
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>((elems + 255) / 256, 1024)), c.groups);
    zero_empty_groups<<<grid, 256, 0, cuda::as_stream(c.stream)>>>(c.offsets, elems, static_cast<uint16_t*>(c.d));
    cuda::check(cudaGetLastError(), "zero_empty_groups");
  }
  by_family(c.product, c.dtype, c.device, [&](auto, auto run) {
    run(small, c.groups, c.offsets, c.rows, c.n, c.k, c.a, c.b, c.d, c.workspace, c.device,
        cuda::as_stream(c.stream));
    return 0;
  });
}

}  // namespace moepp::gemm
