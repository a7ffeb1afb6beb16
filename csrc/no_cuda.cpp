// Built instead of the .cu files when the package is compiled without CUDA:
// every CUDA entry point raises a clear error.
#include <stdexcept>

#include "moe/combine.h"
#include "moe/ffn_pointwise.h"
#include "moe/plan.h"
#include "numeric.h"
#include "router/router.h"

namespace moepp {

namespace {
[[noreturn]] void no_cuda() {
  throw std::runtime_error("moepp_kernels was built without CUDA; rebuild with nvcc available (MOEPP_CUDA=1)");
}
}  // namespace

namespace router {
int64_t cuda_partial_rows(int64_t, int) { no_cuda(); }
template <typename T>
void forward_cuda(const RouterOptions&, const ForwardArgs<T>&, int, uintptr_t) { no_cuda(); }
template <typename T>
void backward_cuda(const RouterOptions&, const BackwardArgs<T>&, int, uintptr_t) { no_cuda(); }
template void forward_cuda<float>(const RouterOptions&, const ForwardArgs<float>&, int, uintptr_t);
template void forward_cuda<double>(const RouterOptions&, const ForwardArgs<double>&, int, uintptr_t);
template void backward_cuda<float>(const RouterOptions&, const BackwardArgs<float>&, int, uintptr_t);
template void backward_cuda<double>(const RouterOptions&, const BackwardArgs<double>&, int, uintptr_t);
}  // namespace router

namespace moe {
int64_t plan_workspace_ints(int64_t, int) { no_cuda(); }
void plan_cuda(const PlanArgs&, int, uintptr_t) { no_cuda(); }
template <typename T>
void gather_rows_cuda(const GatherArgs<T>&, int, uintptr_t) { no_cuda(); }
template <typename T>
void swiglu_cuda(const SwigluArgs<T>&, int, uintptr_t) { no_cuda(); }
template <typename T>
void row_sum_cuda(const RowSumArgs<T>&, int, uintptr_t) { no_cuda(); }
template <typename T>
void combine_cuda(const CombineArgs<T>&, int, uintptr_t) { no_cuda(); }
template <typename T>
void combine_backward_cuda(const CombineArgs<T>&, int, uintptr_t) { no_cuda(); }
#define MOEPP_INSTANTIATE(T)                                                   \
  template void gather_rows_cuda<T>(const GatherArgs<T>&, int, uintptr_t);     \
  template void swiglu_cuda<T>(const SwigluArgs<T>&, int, uintptr_t);          \
  template void row_sum_cuda<T>(const RowSumArgs<T>&, int, uintptr_t);         \
  template void combine_cuda<T>(const CombineArgs<T>&, int, uintptr_t);        \
  template void combine_backward_cuda<T>(const CombineArgs<T>&, int, uintptr_t);
MOEPP_INSTANTIATE(float)
MOEPP_INSTANTIATE(Half)
MOEPP_INSTANTIATE(BFloat16)
#undef MOEPP_INSTANTIATE
}  // namespace moe

}  // namespace moepp
