// Picks the CUTLASS family for (product, dtype) and the tile configuration for
// the shape: the small-M (decode) tile when experts average <= 64 rows.
#include "../cuda/cuda_utils.h"
#include "cutlass_families.h"
#include "grouped_gemm_impl.h"

namespace moepp::gemm {

namespace {

template <typename F>
auto by_family(Product product, DType dtype, F&& f) {
  using namespace sm90;
  const bool bf16 = dtype == DType::kBFloat16;
  switch (product) {
    case Product::kForward:
      return bf16 ? f(forward_bf16_workspace, forward_bf16_run) : f(forward_fp16_workspace, forward_fp16_run);
    case Product::kGradInput:
      return bf16 ? f(grad_input_bf16_workspace, grad_input_bf16_run)
                  : f(grad_input_fp16_workspace, grad_input_fp16_run);
    default:
      return bf16 ? f(grad_weight_bf16_workspace, grad_weight_bf16_run)
                  : f(grad_weight_fp16_workspace, grad_weight_fp16_run);
  }
}

}  // namespace

int64_t workspace_bytes_cuda(Product product, DType dtype, int groups, int device) {
  cuda::DeviceGuard guard(device);
  return by_family(product, dtype, [&](auto workspace, auto) { return workspace(groups, device); });
}

void grouped_gemm_cuda(const CudaCall& c) {
  cuda::DeviceGuard guard(c.device);
  const bool small = c.product != Product::kGradWeight && c.rows <= 64 * int64_t(c.groups);
  by_family(c.product, c.dtype, [&](auto, auto run) {
    run(small, c.groups, c.offsets, c.n, c.k, c.a, c.b, c.d, c.workspace, c.device, cuda::as_stream(c.stream));
    return 0;
  });
}

}  // namespace moepp::gemm
