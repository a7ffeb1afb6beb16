// Reading the indices a plan or a router hands to the kernels with any value in
// them: the public functions check them on the CPU, on CUDA only on request
// (MOEPP_CHECK_INDICES=1), so the kernels themselves treat an entry outside
// [0, n) as naming nothing: its row is skipped (or written as zeros), never read
// or written out of bounds.
#pragma once

#include <cstdint>

#include "../macros.h"

namespace moepp::moe {

MOEPP_HD bool in_range(int64_t index, int64_t n) { return index >= 0 && index < n; }

}  // namespace moepp::moe
