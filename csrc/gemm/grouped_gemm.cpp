#include <string>

#include "grouped_gemm_impl.h"

namespace moepp::gemm {

std::vector<int> cutlass_archs() {
  std::vector<int> archs;
#ifdef MOEPP_WITH_CUTLASS_SM90
  archs.push_back(90);
#endif
#ifdef MOEPP_WITH_CUTLASS_SM80
  archs.push_back(80);
#endif
  return archs;
}

std::vector<GroupProblem> group_problems(Product product, const TensorView& offsets, int64_t buffer_rows, int32_t n,
                                         int32_t k) {
  if (offsets.ndim != 1 || offsets.shape[0] < 1) throw_invalid("offsets", "expected shape [groups + 1]");
  check_view(offsets, "offsets", DType::kInt32, {offsets.shape[0]}, DeviceType::kCPU, -1);
  std::vector<GroupProblem> out;
  for (int g = 0; g + 1 < offsets.shape[0]; ++g) {
    out.push_back(group_problem(product, g, offsets.ptr<int32_t>(), buffer_rows, n, k));
  }
  return out;
}

namespace {

void check_dtype(DType dtype, const char* name) {
  if (dtype != DType::kBFloat16 && dtype != DType::kFloat16) throw_invalid(name, "must be bfloat16 or float16");
}

// 16-byte rows for TMA (sm90) and cp.async (sm80); no empty extent.
void check_extent(int64_t extent, const char* name) {
  if (extent <= 0 || extent % 8 != 0) {
    throw_invalid(name, "extent " + std::to_string(extent) + " must be a positive multiple of 8 (16 bytes)");
  }
}

// The operands' base addresses: every row then starts 16-byte aligned.
void check_address(const TensorView& t, const char* name) {
  if (reinterpret_cast<uintptr_t>(t.data) % 16 != 0) throw_invalid(name, "must start at a 16-byte aligned address");
}

}  // namespace

int64_t workspace_bytes(Product product, DType dtype, int groups, int device) {
  check_dtype(dtype, "dtype");
  if (cutlass_archs().empty()) throw std::runtime_error("moepp_kernels was built without the CUTLASS kernels");
  return workspace_bytes_cuda(product, dtype, groups, device);
}

void grouped_gemm(Product product, const TensorView& a, const TensorView& b, const TensorView& d,
                  const TensorView& offsets, const TensorView& workspace, uintptr_t stream) {
  if (cutlass_archs().empty()) throw std::runtime_error("moepp_kernels was built without the CUTLASS kernels");
  if (a.device != DeviceType::kCUDA) throw_invalid("a", "the CUTLASS grouped GEMM runs on CUDA tensors");
  const int32_t dev = a.device_index;
  check_dtype(a.dtype, "a");
  if (a.ndim != 2 || b.ndim < 2) throw_invalid("a", "expected 2-D rows and 2-D or 3-D b");
  if (offsets.ndim != 1 || offsets.shape[0] < 1) throw_invalid("offsets", "expected shape [groups + 1]");
  const int groups = static_cast<int>(offsets.shape[0] - 1);
  const int64_t rows = a.shape[0];
  check_view(offsets, "offsets", DType::kInt32, {groups + 1}, DeviceType::kCUDA, dev);
  CudaCall c{product, a.dtype, groups, rows, 0, 0, offsets.ptr<int32_t>(), a.data, b.data, d.data,
             workspace.ptr<char>(), dev, stream};
  if (product == Product::kGradWeight) {  // a = dy [R, N], b = x [R, K] -> d [G, N, K]
    const int64_t n = a.shape[1], k = b.shape[1];
    check_view(a, "grad_out", a.dtype, {rows, n}, DeviceType::kCUDA, dev);
    check_view(b, "x", a.dtype, {rows, k}, DeviceType::kCUDA, dev);
    check_view(d, "grad_weight", a.dtype, {groups, n, k}, DeviceType::kCUDA, dev);
    c.n = static_cast<int32_t>(n);
    c.k = static_cast<int32_t>(k);
  } else {  // forward: a [R, K] -> d [R, N]; grad_input: a = dy [R, N] -> d [R, K]; b = W [G, N, K]
    const bool forward = product == Product::kForward;
    const int64_t n = b.shape[1], k = b.shape[2];
    const int64_t in = forward ? k : n, out = forward ? n : k;
    check_view(a, forward ? "a" : "grad_out", a.dtype, {rows, in}, DeviceType::kCUDA, dev);
    check_view(b, "weight", a.dtype, {groups, n, k}, DeviceType::kCUDA, dev);
    check_view(d, forward ? "out" : "grad_in", a.dtype, {rows, out}, DeviceType::kCUDA, dev);
    c.n = static_cast<int32_t>(out);  // group_problem(): (output columns, reduction)
    c.k = static_cast<int32_t>(in);
  }
  check_extent(c.n, "N");
  check_extent(c.k, "K");
  check_address(a, product == Product::kForward ? "a" : "grad_out");
  check_address(b, product == Product::kGradWeight ? "x" : "weight");
  check_address(d, product == Product::kForward ? "out" : product == Product::kGradInput ? "grad_in" : "grad_weight");
  if (groups == 0) return;
  if (workspace.ndim != 1) throw_invalid("workspace", "expected a 1-D uint8 buffer");
  check_view(workspace, "workspace", DType::kUInt8, {workspace.shape[0]}, DeviceType::kCUDA, dev);
  if (workspace.shape[0] < workspace_bytes_cuda(product, a.dtype, groups, dev)) {
    throw_invalid("workspace", "smaller than workspace_bytes()");
  }
  grouped_gemm_cuda(c);
}

}  // namespace moepp::gemm
