// How much dynamic shared memory a kernel may ask for, and when it must opt in
// (CUDA programming guide, "Shared Memory"): without the opt-in a block has 48 KB
// in all, its static shared memory included; with
// cudaFuncAttributeMaxDynamicSharedMemorySize it may have up to the device's
// per-block opt-in limit, static included. nvcc 13 gives every sm_90a kernel a
// 1 KB static section of its own, so the static part is never 0 there. Host
// arithmetic only (no CUDA headers): the launchers and the CPU tests share it.
#pragma once

#include <algorithm>
#include <cstddef>

namespace moepp::cuda {

constexpr size_t kDefaultSharedPerBlock = 48 * 1024;

// The most dynamic shared memory a kernel with `static_bytes` can be given.
inline size_t dynamic_shared_budget(size_t optin_bytes, size_t static_bytes) {
  return optin_bytes > static_bytes ? optin_bytes - static_bytes : 0;
}

struct DynamicSharedPlan {
  size_t budget;      // optin - static
  bool fits;          // the request is within the budget
  long long attribute;  // value to set MaxDynamicSharedMemorySize to, or -1: leave it
};

// `current` is the kernel's MaxDynamicSharedMemorySize now (cudaFuncGetAttributes).
// Until it is raised, a launch gets at most 48 KB - static. When the request needs
// more, the attribute goes to the whole budget: never lowered, so threads launching
// one kernel with different sizes cannot undo each other's opt-in.
inline DynamicSharedPlan plan_dynamic_shared(size_t bytes, size_t static_bytes, size_t optin_bytes, size_t current) {
  DynamicSharedPlan p{dynamic_shared_budget(optin_bytes, static_bytes), false, -1};
  p.fits = bytes <= p.budget;
  const size_t by_default = dynamic_shared_budget(kDefaultSharedPerBlock, static_bytes);
  const size_t granted = current >= p.budget ? p.budget : std::min(current, by_default);
  if (p.fits && bytes > granted) p.attribute = static_cast<long long>(p.budget);
  return p;
}

}  // namespace moepp::cuda
