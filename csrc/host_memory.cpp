#include "host_memory.h"

#include <stdexcept>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace moepp {

int64_t advise_huge_pages(uintptr_t data, int64_t bytes) {
  if (bytes < 0) throw std::invalid_argument("bytes: must be >= 0, got " + std::to_string(bytes));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  const uintptr_t begin = (data + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (data + static_cast<uintptr_t>(bytes)) & ~(kHugePage - 1);
  if (data == 0 || end <= begin) return 0;
  if (madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE) != 0) return 0;
  return static_cast<int64_t>(end - begin);
#else
  (void)data;
  return 0;
#endif
}

}  // namespace moepp
