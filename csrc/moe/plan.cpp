#include "plan.h"

#include <string>
#include <vector>

namespace moepp::moe {

void plan_cpu(const PlanArgs& a) {
  std::vector<int64_t> next(a.n_ffn + 1, 0);
  for (int64_t s = 0; s < a.slots; ++s) {
    const int32_t e = a.ids[s];
    if (e >= 0 && e < a.n_ffn) ++next[e + 1];
  }
  for (int e = 0; e < a.n_ffn; ++e) next[e + 1] += next[e];
  for (int e = 0; e <= a.n_ffn; ++e) a.offsets[e] = static_cast<int32_t>(next[e]);
  for (int64_t s = 0; s < a.slots; ++s) {
    const int32_t e = a.ids[s];
    if (e >= 0 && e < a.n_ffn) {
      const int64_t row = next[e]++;
      a.row_src[row] = static_cast<int32_t>(s);
      a.slot_row[s] = static_cast<int32_t>(row);
    } else {
      a.slot_row[s] = -1;
    }
  }
}

void build_plan(const TensorView& ids, int n_ffn, const TensorView& offsets, const TensorView& row_src,
                const TensorView& slot_row, const TensorView* workspace, uintptr_t stream) {
  if (ids.ndim != 2) throw_invalid("topk_ids", "expected shape [tokens, top_k]");
  if (n_ffn < 0 || n_ffn > kMaxPlanExperts) {
    throw_invalid("n_ffn", "must be in [0, " + std::to_string(kMaxPlanExperts) + "], got " + std::to_string(n_ffn));
  }
  const int64_t slots = ids.shape[0] * ids.shape[1];
  if (slots >= (int64_t(1) << 31)) throw_invalid("topk_ids", "tokens * top_k must be < 2**31");
  const DeviceType dev = ids.device;
  const int32_t idx = ids.device_index;
  check_view(ids, "topk_ids", DType::kInt32, {ids.shape[0], ids.shape[1]}, dev, idx);
  check_view(offsets, "offsets", DType::kInt32, {n_ffn + 1}, dev, idx);
  check_view(row_src, "row_src", DType::kInt32, {slots}, dev, idx);
  check_view(slot_row, "slot_row", DType::kInt32, {ids.shape[0], ids.shape[1]}, dev, idx);
  PlanArgs a;
  a.slots = slots;
  a.n_ffn = n_ffn;
  a.ids = ids.ptr<int32_t>();
  a.offsets = offsets.ptr<int32_t>();
  a.row_src = row_src.ptr<int32_t>();
  a.slot_row = slot_row.ptr<int32_t>();
  if (dev == DeviceType::kCUDA) {
    if (workspace == nullptr) throw_invalid("workspace", "needed on CUDA");
    check_view(*workspace, "workspace", DType::kInt32, {plan_workspace_ints(slots, n_ffn)}, dev, idx);
    a.workspace = workspace->ptr<int32_t>();
    plan_cuda(a, idx, stream);
  } else {
    plan_cpu(a);
  }
}

}  // namespace moepp::moe
