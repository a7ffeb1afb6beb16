// CUDA permutation plan in three launches, no host sync:
//   count   - per chunk of slots, a shared-memory histogram of FFN expert ids;
//   scan    - one block: exclusive scan of the [expert][chunk] counts, giving
//             each (expert, chunk) its first row and the offsets;
//   scatter - per chunk, a stable multi-split: warps rank equal ids with
//             __match_any_sync, tiles are processed in slot order.
#include <algorithm>

#include "../cuda/cuda_utils.h"
#include "plan.h"

namespace moepp::moe {

namespace {

constexpr int kScanThreads = 1024;
constexpr int kTileThreads = kPlanTileThreads;
constexpr int kTileWarps = kTileThreads / 32;
constexpr int64_t kMinSlotsPerChunk = 1024;
constexpr int64_t kMaxScanEntries = 1 << 16;

int64_t chunks_for(int64_t slots, int n_ffn) {
  const int64_t by_size = (slots + kMinSlotsPerChunk - 1) / kMinSlotsPerChunk;
  const int64_t by_scan = std::max<int64_t>(1, kMaxScanEntries / std::max(n_ffn, 1));
  return std::max<int64_t>(1, std::min(by_size, by_scan));
}

__device__ bool is_ffn(int32_t e, int n_ffn) { return e >= 0 && e < n_ffn; }

__global__ void count_kernel(const int32_t* ids, int64_t slots, int n_ffn, int64_t chunk, int32_t* counts) {
  extern __shared__ int32_t hist[];
  for (int e = threadIdx.x; e < n_ffn; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  const int64_t begin = blockIdx.x * chunk;
  const int64_t end = min(begin + chunk, slots);
  for (int64_t s = begin + threadIdx.x; s < end; s += blockDim.x) {
    const int32_t e = ids[s];
    if (is_ffn(e, n_ffn)) atomicAdd(&hist[e], 1);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < n_ffn; e += blockDim.x) counts[int64_t(e) * gridDim.x + blockIdx.x] = hist[e];
}

// Exclusive scan of counts[n_ffn * chunks] in place; offsets[e] = first row of expert e.
__global__ void scan_kernel(int32_t* counts, int64_t entries, int64_t chunks, int n_ffn, int32_t* offsets) {
  __shared__ int32_t partial[kScanThreads];
  const int64_t per_thread = (entries + kScanThreads - 1) / kScanThreads;
  const int64_t begin = threadIdx.x * per_thread;
  const int64_t end = min(begin + per_thread, entries);
  int32_t local = 0;
  for (int64_t i = begin; i < end; ++i) local += counts[i];
  partial[threadIdx.x] = local;
  __syncthreads();
  for (int stride = 1; stride < kScanThreads; stride *= 2) {
    const int32_t add = threadIdx.x >= stride ? partial[threadIdx.x - stride] : 0;
    __syncthreads();
    partial[threadIdx.x] += add;
    __syncthreads();
  }
  int32_t running = partial[threadIdx.x] - local;
  for (int64_t i = begin; i < end; ++i) {
    const int32_t c = counts[i];
    counts[i] = running;
    running += c;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < n_ffn; e += kScanThreads) offsets[e] = counts[int64_t(e) * chunks];
  if (threadIdx.x == 0) offsets[n_ffn] = partial[kScanThreads - 1];
}

__global__ void scatter_kernel(const int32_t* ids, int64_t slots, int n_ffn, int64_t chunk, const int32_t* starts,
                               int32_t* row_src, int32_t* slot_row) {
  extern __shared__ int32_t smem[];
  int32_t* running = smem;                  // [n_ffn]: next row of each expert in this chunk
  int32_t* warp_counts = smem + n_ffn;      // [kTileWarps][n_ffn]
  for (int e = threadIdx.x; e < n_ffn; e += blockDim.x) running[e] = starts[int64_t(e) * gridDim.x + blockIdx.x];
  for (int i = threadIdx.x; i < kTileWarps * n_ffn; i += blockDim.x) warp_counts[i] = 0;
  __syncthreads();
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const unsigned lanes_below = (1u << lane) - 1u;
  const int64_t begin = blockIdx.x * chunk;
  const int64_t end = min(begin + chunk, slots);
  for (int64_t tile = begin; tile < end; tile += kTileThreads) {
    const int64_t s = tile + threadIdx.x;
    const int32_t e = s < end ? ids[s] : -1;
    const bool mine = s < end && is_ffn(e, n_ffn);
    const int32_t key = mine ? e : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, key);
    const bool leader = (__ffs(peers) - 1) == lane;
    const int32_t rank = __popc(peers & lanes_below);
    if (mine && leader) warp_counts[warp * n_ffn + e] = __popc(peers);
    __syncthreads();
    if (mine) {
      int32_t row = running[e] + rank;
      for (int w = 0; w < warp; ++w) row += warp_counts[w * n_ffn + e];
      row_src[row] = static_cast<int32_t>(s);
      slot_row[s] = row;
    } else if (s < end) {
      slot_row[s] = -1;
    }
    __syncthreads();
    if (mine && leader) {
      atomicAdd(&running[e], __popc(peers));
      warp_counts[warp * n_ffn + e] = 0;
    }
    __syncthreads();
  }
}

}  // namespace

int64_t plan_workspace_ints(int64_t slots, int n_ffn) { return std::max<int64_t>(1, int64_t(n_ffn) * chunks_for(slots, n_ffn)); }

void plan_cuda(const PlanArgs& a, int device, uintptr_t stream) {
  cuda::DeviceGuard guard(device);
  cudaStream_t s = cuda::as_stream(stream);
  const int64_t chunks = chunks_for(a.slots, a.n_ffn);
  const int64_t chunk = std::max<int64_t>(1, (a.slots + chunks - 1) / chunks);
  const PlanSharedBytes smem = plan_shared_bytes(a.n_ffn);
  cuda::allow_shared_memory(count_kernel, smem.count);
  count_kernel<<<chunks, 256, smem.count, s>>>(a.ids, a.slots, a.n_ffn, chunk, a.workspace);
  // Checked after each launch: no kernel runs on a workspace that a failed one never wrote.
  cuda::check(cudaGetLastError(), "permutation plan count kernel");
  scan_kernel<<<1, kScanThreads, 0, s>>>(a.workspace, int64_t(a.n_ffn) * chunks, chunks, a.n_ffn, a.offsets);
  cuda::check(cudaGetLastError(), "permutation plan scan kernel");
  cuda::allow_shared_memory(scatter_kernel, smem.scatter);
  scatter_kernel<<<chunks, kTileThreads, smem.scatter, s>>>(a.ids, a.slots, a.n_ffn, chunk, a.workspace, a.row_src,
                                                             a.slot_row);
  cuda::check(cudaGetLastError(), "permutation plan scatter kernel");
}

}  // namespace moepp::moe
