// Permutation plan: the token slots routed to FFN experts, stably sorted by
// expert (ties in slot order), so each expert's rows are contiguous.
// Zero-computation slots get no row (spec: "Combine"; ARCHITECTURE: data flow).
#pragma once

#include <cstddef>
#include <cstdint>

#include "../tensor_view.h"

namespace moepp::moe {

// The CUDA plan keeps per-expert counters in shared memory; 1024 is also the router's limit.
constexpr int kMaxPlanExperts = 1024;
constexpr int kPlanTileThreads = 256;  // the scatter kernel's block

// Dynamic shared memory of the CUDA plan's kernels: the count kernel's histogram,
// and the scatter kernel's running rows plus one count row per warp.
struct PlanSharedBytes {
  size_t count, scatter;
};
inline PlanSharedBytes plan_shared_bytes(int n_ffn) {
  const size_t row = sizeof(int32_t) * static_cast<size_t>(n_ffn);
  return {row, row * (1 + kPlanTileThreads / 32)};
}

struct PlanArgs {
  int64_t slots = 0;            // T * k, slot s = t * k + j
  int32_t n_ffn = 0;            // experts [0, n_ffn) are FFN experts
  const int32_t* ids = nullptr;  // [slots]; ids outside [0, n_ffn) get no row
  int32_t* offsets = nullptr;    // [n_ffn + 1]: expert e owns rows [offsets[e], offsets[e+1])
  int32_t* row_src = nullptr;    // [slots]: slot of each row; rows >= offsets[n_ffn] untouched
  int32_t* slot_row = nullptr;   // [slots]: row of each slot, -1 for zero-computation slots
  int32_t* workspace = nullptr;  // CUDA only: plan_workspace_ints(slots, n_ffn) ints
};

int64_t plan_workspace_ints(int64_t slots, int n_ffn);
void plan_cpu(const PlanArgs& args);
void plan_cuda(const PlanArgs& args, int device, uintptr_t stream);

void build_plan(const TensorView& ids, int n_ffn, const TensorView& offsets, const TensorView& row_src,
                const TensorView& slot_row, const TensorView* workspace, uintptr_t stream);

}  // namespace moepp::moe
