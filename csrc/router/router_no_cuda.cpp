// Built instead of router_cuda.cu when the package is compiled without CUDA.
#include <stdexcept>

#include "router.h"

namespace moepp::router {

namespace {
[[noreturn]] void no_cuda() {
  throw std::runtime_error("moepp_kernels was built without CUDA; rebuild with nvcc available (MOEPP_CUDA=1)");
}
}  // namespace

int64_t cuda_partial_rows(int64_t, int) { no_cuda(); }
template <typename T>
void forward_cuda(const RouterOptions&, const ForwardArgs<T>&, int, uintptr_t) { no_cuda(); }
template <typename T>
void backward_cuda(const RouterOptions&, const BackwardArgs<T>&, int, uintptr_t) { no_cuda(); }

template void forward_cuda<float>(const RouterOptions&, const ForwardArgs<float>&, int, uintptr_t);
template void forward_cuda<double>(const RouterOptions&, const ForwardArgs<double>&, int, uintptr_t);
template void backward_cuda<float>(const RouterOptions&, const BackwardArgs<float>&, int, uintptr_t);
template void backward_cuda<double>(const RouterOptions&, const BackwardArgs<double>&, int, uintptr_t);

}  // namespace moepp::router
