// CUDA fused router: a group of LANES threads (a slice of a warp) per token,
// running the per-token math of router_math.h. G is staged in shared memory
// when it fits; per-block expert counts and probability sums are reduced in
// shared memory and written once per block (no host sync, no allocation).
#include "../cuda/cuda_utils.h"
#include "router.h"
#include "router_launch.h"

namespace moepp::router {

namespace {

template <int LANES>
struct WarpExchange {
  unsigned mask;
  int lane;

  __device__ WarpExchange() {
    const int warp_lane = threadIdx.x % 32;
    lane = warp_lane % LANES;
    mask = LANES == 32 ? 0xffffffffu : (((1u << LANES) - 1u) << (warp_lane - lane));
  }
  __device__ int rank() const { return lane; }
  template <typename T>
  __device__ T shfl_xor(T v, int offset) const {
    return __shfl_xor_sync(mask, v, offset, LANES);
  }
  __device__ void sync() const { __syncwarp(mask); }
};

template <int LANES>
using WarpGroup = ButterflyGroup<LANES, WarpExchange<LANES>>;

// Copies G [n, n] into shared memory with row stride n + 1 (fewer bank conflicts).
template <typename T>
__device__ T* stage_residual_weight(const T* G, int n, T* smem) {
  for (int i = threadIdx.x; i < n * n; i += kThreads) smem[(i / n) * (n + 1) + i % n] = G[i];
  return smem;
}

// Copies one token's row into the group's shared scratch: 16-byte loads when
// the row is 16-byte aligned and n * sizeof(T) is a multiple of 16 (dst then
// is too), element loads otherwise; coalesced either way.
template <class Group, typename T>
__device__ void stage_row(const Group& g, const T* row, int n, T* dst) {
  constexpr int kVec = 16 / sizeof(T);
  if ((n * sizeof(T)) % 16 == 0 && reinterpret_cast<uintptr_t>(row) % 16 == 0) {
    const int4* src4 = reinterpret_cast<const int4*>(row);
    int4* dst4 = reinterpret_cast<int4*>(dst);
    for (int i = g.rank(); i < n / kVec; i += Group::kSize) dst4[i] = __ldg(src4 + i);
  } else {
    for (int j = g.rank(); j < n; j += Group::kSize) dst[j] = row[j];
  }
}

// Both kernels take minBlocksPerSM = 1: ptxas otherwise caps them at 96-128
// registers and spills the per-slot arrays (ids, gates) that the unrolled slot
// loops keep in registers.
template <int LANES, typename T>
__global__ void __launch_bounds__(kThreads, 1) forward_kernel(RouterOptions opt, ForwardArgs<T> a, bool staged) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  constexpr int kGroups = kThreads / LANES;
  const int n = opt.num_experts;
  const int k = opt.top_k;
  T* cursor = reinterpret_cast<T*>(smem_raw);
  const T* G = a.G;
  int64_t ldg = n;
  if (staged) {
    G = stage_residual_weight(a.G, n, cursor);
    ldg = n + 1;
    cursor += n * (n + 1);
  }
  const int group = threadIdx.x / LANES;
  T* val = cursor + group * n;
  cursor += kGroups * n;
  T* sel = cursor + group * n;
  cursor += kGroups * n;
  T* prob_base = nullptr;
  if (a.prob_partials != nullptr) {
    prob_base = cursor;
    cursor += kGroups * n;
    for (int i = threadIdx.x; i < kGroups * n; i += kThreads) prob_base[i] = T(0);
  }
  int32_t* counts = reinterpret_cast<int32_t*>(cursor);
  for (int j = threadIdx.x; j < n; j += kThreads) counts[j] = 0;
  __syncthreads();

  const WarpGroup<LANES> g{WarpExchange<LANES>()};
  T* prob_acc = prob_base != nullptr ? prob_base + group * n : nullptr;
  for (int64_t t = int64_t(blockIdx.x) * kGroups + group; t < a.tokens; t += int64_t(gridDim.x) * kGroups) {
    g.sync();
    if (a.G != nullptr) {
      for (int j = g.rank(); j < n; j += LANES) sel[j] = a.prev[t * n + j];
      g.sync();
    }
    stage_row(g, a.logits + t * n, n, val);
    g.sync();
    int32_t ids[kMaxTopK];
    T gates[kMaxTopK];
    T* out = a.logits_out != nullptr ? a.logits_out + t * n : nullptr;
    route_token(g, opt, val, a.G != nullptr ? G : nullptr, ldg, a.bias, out, val, sel, prob_acc, ids, gates);
    for_each_slot(k, [&](int s) {
      if (s % LANES != g.rank()) return;
      a.ids[t * k + s] = ids[s];
      a.weights[t * k + s] = gates[s];
      atomicAdd(&counts[ids[s]], 1);
    });
  }
  __syncthreads();
  for (int j = threadIdx.x; j < n; j += kThreads) {
    if (counts[j] != 0) atomicAdd(&a.counts[j], counts[j]);
    if (prob_base != nullptr) {
      T total = 0;
      for (int gi = 0; gi < kGroups; ++gi) total += prob_base[gi * n + j];
      a.prob_partials[int64_t(blockIdx.x) * n + j] = total;
    }
  }
}

template <int LANES, typename T>
__global__ void __launch_bounds__(kThreads, 1) backward_kernel(RouterOptions opt, BackwardArgs<T> a, bool staged) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  constexpr int kGroups = kThreads / LANES;
  const int n = opt.num_experts;
  const int k = opt.top_k;
  T* cursor = reinterpret_cast<T*>(smem_raw);
  const T* G = a.G;
  int64_t ldg = n;
  if (staged) {
    G = stage_residual_weight(a.G, n, cursor);
    ldg = n + 1;
    cursor += n * (n + 1);
  }
  const int group = threadIdx.x / LANES;
  T* val = cursor + group * n;
  cursor += kGroups * n;
  T* buf = cursor + group * n;
  __syncthreads();

  const WarpGroup<LANES> g{WarpExchange<LANES>()};
  for (int64_t t = int64_t(blockIdx.x) * kGroups + group; t < a.tokens; t += int64_t(gridDim.x) * kGroups) {
    g.sync();
    stage_row(g, a.routed + t * n, n, val);
    g.sync();
    route_token_backward(g, opt, a.ids + t * k, a.grad_weights ? a.grad_weights + t * k : nullptr,
                         a.grad_logits_out ? a.grad_logits_out + t * n : nullptr, a.grad_prob_sum,
                         a.G != nullptr ? G : nullptr, ldg, a.grad_logits + t * n,
                         a.grad_prev ? a.grad_prev + t * n : nullptr, val, buf);
  }
}

}  // namespace

int64_t cuda_partial_rows(int64_t tokens, int num_experts) { return blocks_for(tokens, lanes_for(num_experts)); }

template <typename T>
void forward_cuda(const RouterOptions& opt, const ForwardArgs<T>& args, int device, uintptr_t stream) {
  if (args.tokens == 0) return;
  cuda::DeviceGuard guard(device);
  const int n = opt.num_experts;
  with_lanes(lanes_for(n), [&](auto lanes) {
    constexpr int L = decltype(lanes)::value;
    auto kernel = forward_kernel<L, T>;
    const cuda::KernelSharedMemory limits = cuda::shared_memory_of(kernel);
    const SharedLayout smem =
        shared_layout(true, sizeof(T), n, args.prob_partials != nullptr, args.G != nullptr, limits.budget());
    cuda::allow_shared_memory(kernel, limits, smem.bytes);
    kernel<<<blocks_for(args.tokens, L), kThreads, smem.bytes, cuda::as_stream(stream)>>>(opt, args, smem.staged);
  });
  cuda::check(cudaGetLastError(), "router forward kernel launch");
}

template <typename T>
void backward_cuda(const RouterOptions& opt, const BackwardArgs<T>& args, int device, uintptr_t stream) {
  if (args.tokens == 0) return;
  cuda::DeviceGuard guard(device);
  const int n = opt.num_experts;
  with_lanes(lanes_for(n), [&](auto lanes) {
    constexpr int L = decltype(lanes)::value;
    auto kernel = backward_kernel<L, T>;
    const cuda::KernelSharedMemory limits = cuda::shared_memory_of(kernel);
    const SharedLayout smem = shared_layout(false, sizeof(T), n, false, args.G != nullptr, limits.budget());
    cuda::allow_shared_memory(kernel, limits, smem.bytes);
    kernel<<<blocks_for(args.tokens, L), kThreads, smem.bytes, cuda::as_stream(stream)>>>(opt, args, smem.staged);
  });
  cuda::check(cudaGetLastError(), "router backward kernel launch");
}

template void forward_cuda<float>(const RouterOptions&, const ForwardArgs<float>&, int, uintptr_t);
template void forward_cuda<double>(const RouterOptions&, const ForwardArgs<double>&, int, uintptr_t);
template void backward_cuda<float>(const RouterOptions&, const BackwardArgs<float>&, int, uintptr_t);
template void backward_cuda<double>(const RouterOptions&, const BackwardArgs<double>&, int, uintptr_t);

}  // namespace moepp::router
