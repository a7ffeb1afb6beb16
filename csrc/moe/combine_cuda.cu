// CUDA combine epilogue: one block per token (grid-stride), threads across the
// hidden dim with 16-byte accesses when they fit. Thread 0 builds the token's
// mix once in shared memory (its per-slot arrays are indexed at run time, so no
// thread keeps a copy in local memory); the backward keeps one dot product per
// source (dout·x_e, dout·v_c, dout·y_row) in registers over a slot loop unrolled
// to the compile-time MAX_K, and reduces them across the block.
#include <algorithm>

#include "../cuda/cuda_utils.h"
#include "../cuda/vec.h"
#include "combine.h"

namespace moepp::moe {

namespace {

using cuda::load_vec;
using cuda::store_vec;
using cuda::Vec;

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxBlocks = 16384;

// Builds token t's mix in `m` (shared) and makes it visible to the block.
template <typename T>
__device__ void load_token_mix(const CombineArgs<T>& a, int64_t t, TokenMix& m) {
  if (threadIdx.x == 0) {
    analyze_token(a.layout, a.k, a.ids + t * a.k, a.weights + t * a.k, a.slot_row + t * a.k, a.tokens * a.k,
                  a.mix + t * 2 * a.n_constant, m);
  }
  __syncthreads();
}

template <typename T, int V>
__device__ float dot_vec(const Vec<T, V>& g, const Vec<T, V>& v) {
  float acc = 0.0f;
#pragma unroll
  for (int j = 0; j < V; ++j) acc += to_float(g.v[j]) * to_float(v.v[j]);
  return acc;
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads) combine_kernel(CombineArgs<T> a) {
  __shared__ TokenMix m;
  for (int64_t t = blockIdx.x; t < a.tokens; t += gridDim.x) {
    load_token_mix(a, t, m);
    const bool uses_x = m.uses_x();
    const int n_const = m.n_const, n_rows = m.n_rows;
    for (int64_t d = int64_t(threadIdx.x) * V; d < a.dim; d += int64_t(kThreads) * V) {
      float acc[V];
      if (uses_x) {
        const Vec<T, V> x = load_vec<T, V>(a.x + t * a.dim + d);
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] = m.x_coef * (a.scale * to_float(x.v[j]));
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] = 0.0f;
      }
      for (int i = 0; i < n_const; ++i) {
        const Vec<T, V> v = load_vec<T, V>(a.const_value + m.const_id[i] * a.dim + d);
        const float c = m.const_w[i] * m.a2[i];
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] += c * to_float(v.v[j]);
      }
      for (int f = 0; f < n_rows; ++f) {
        const Vec<T, V> y = load_vec<T, V>(a.y + int64_t(m.row[f]) * a.dim + d);
        const float w = m.row_w[f];
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] += w * to_float(y.v[j]);
      }
      Vec<T, V> out;
#pragma unroll
      for (int j = 0; j < V; ++j) out.v[j] = from_float<T>(acc[j]);
      store_vec<T, V>(a.out + t * a.dim + d, out);
    }
    __syncthreads();  // m is rebuilt for the next token
  }
}

// MAX_K bounds the token's slots (k <= MAX_K): sources [x | constants | rows],
// at most 1 + MAX_K dot products, each in a register (minBlocksPerSM = 1 keeps
// ptxas from capping the registers below what they need and spilling).
template <typename T, int V, int MAX_K>
__global__ void __launch_bounds__(kThreads, 1) combine_backward_kernel(CombineArgs<T> a) {
  constexpr int kDots = 1 + MAX_K;
  __shared__ TokenMix m;
  __shared__ float partial[kDots][kWarps];
  __shared__ float dots[kDots];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t t = blockIdx.x; t < a.tokens; t += gridDim.x) {
    load_token_mix(a, t, m);
    const bool uses_x = m.uses_x();
    const int n_const = m.n_const, n_slots = m.n_const + m.n_rows;
    const float dx_coef = a.scale * m.x_coef;
    float acc[kDots];
#pragma unroll
    for (int i = 0; i < kDots; ++i) acc[i] = 0.0f;
    for (int64_t d = int64_t(threadIdx.x) * V; d < a.dim; d += int64_t(kThreads) * V) {
      const Vec<T, V> g = load_vec<T, V>(a.dout + t * a.dim + d);
      if (uses_x) acc[0] += a.scale * dot_vec(g, load_vec<T, V>(a.x + t * a.dim + d));
#pragma unroll
      for (int i = 0; i < MAX_K; ++i) {
        if (i >= n_slots) break;
        if (i < n_const) {
          acc[1 + i] += dot_vec(g, load_vec<T, V>(a.const_value + m.const_id[i] * a.dim + d));
        } else {
          const int f = i - n_const;
          const int64_t row = int64_t(m.row[f]) * a.dim + d;
          acc[1 + i] += dot_vec(g, load_vec<T, V>(a.y + row));
          const float w = m.row_w[f];
          Vec<T, V> dy;
#pragma unroll
          for (int j = 0; j < V; ++j) dy.v[j] = from_float<T>(w * to_float(g.v[j]));
          store_vec<T, V>(a.dy + row, dy);
        }
      }
      Vec<T, V> dx;
#pragma unroll
      for (int j = 0; j < V; ++j) dx.v[j] = from_float<T>(dx_coef * to_float(g.v[j]));
      store_vec<T, V>(a.dx + t * a.dim + d, dx);
    }
#pragma unroll
    for (int i = 0; i < kDots; ++i) {
      if (i > n_slots) break;
      float v = acc[i];
      for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
      if (lane == 0) partial[i][warp] = v;
    }
    __syncthreads();
    if (threadIdx.x <= n_slots) {
      float total = 0.0f;
      for (int w = 0; w < kWarps; ++w) total += partial[threadIdx.x][w];
      dots[threadIdx.x] = total;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      token_gradients(m, a.k, a.n_constant, dots[0], dots + 1, dots + 1 + n_const, a.dweights + t * a.k,
                      a.dmix + t * 2 * a.n_constant, a.v_coef + t * a.n_constant);
    }
    __syncthreads();  // m and dots are rebuilt for the next token
  }
}

template <typename T>
bool vectorizable(const CombineArgs<T>& a) {
  constexpr int V = cuda::kVecWidth<T>;
  return a.dim % V == 0 && cuda::aligned16(a.x) && cuda::aligned16(a.y) && cuda::aligned16(a.const_value) &&
         (a.out == nullptr || cuda::aligned16(a.out)) && (a.dout == nullptr || cuda::aligned16(a.dout)) &&
         (a.dy == nullptr || cuda::aligned16(a.dy)) && (a.dx == nullptr || cuda::aligned16(a.dx));
}

int64_t blocks_for(int64_t tokens) { return std::max<int64_t>(1, std::min(tokens, kMaxBlocks)); }

}  // namespace

template <typename T>
void combine_cuda(const CombineArgs<T>& a, int device, uintptr_t stream) {
  if (a.tokens == 0) return;
  cuda::DeviceGuard guard(device);
  cuda::with_vec_width<T>(vectorizable(a), [&](auto width) {
    combine_kernel<T, decltype(width)::value><<<blocks_for(a.tokens), kThreads, 0, cuda::as_stream(stream)>>>(a);
  });
  cuda::check(cudaGetLastError(), "combine kernel");
}

template <typename T>
void combine_backward_cuda(const CombineArgs<T>& a, int device, uintptr_t stream) {
  if (a.tokens == 0) return;
  cuda::DeviceGuard guard(device);
  cuda::with_vec_width<T>(vectorizable(a), [&](auto width) {
    constexpr int V = decltype(width)::value;
    auto kernel = a.k <= 4 ? combine_backward_kernel<T, V, 4> : combine_backward_kernel<T, V, kMaxSlots>;
    kernel<<<blocks_for(a.tokens), kThreads, 0, cuda::as_stream(stream)>>>(a);
  });
  cuda::check(cudaGetLastError(), "combine backward kernel");
}

#define MOEPP_INSTANTIATE(T)                                                 \
  template void combine_cuda<T>(const CombineArgs<T>&, int, uintptr_t);        \
  template void combine_backward_cuda<T>(const CombineArgs<T>&, int, uintptr_t);
MOEPP_INSTANTIATE(float)
MOEPP_INSTANTIATE(Half)
MOEPP_INSTANTIATE(BFloat16)
#undef MOEPP_INSTANTIATE

}  // namespace moepp::moe
