// CUDA combine epilogue: one block per token (grid-stride), threads across the
// hidden dim with 16-byte accesses when they fit; the backward reduces its dot
// products (dout·x_e, dout·v_c, dout·y_row) across the block.
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
constexpr int kMaxDots = 2 * kMaxSlots + 1;  // x, one per constant slot, one per FFN slot

template <typename T>
__device__ TokenMix token_mix(const CombineArgs<T>& a, int64_t t) {
  return analyze_token(a.layout, a.k, a.ids + t * a.k, a.weights + t * a.k, a.slot_row + t * a.k,
                       a.mix + t * 2 * a.n_constant);
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads) combine_kernel(CombineArgs<T> a) {
  for (int64_t t = blockIdx.x; t < a.tokens; t += gridDim.x) {
    const TokenMix m = token_mix(a, t);
    for (int64_t d = int64_t(threadIdx.x) * V; d < a.dim; d += int64_t(kThreads) * V) {
      float acc[V];
      if (m.uses_x()) {
        const Vec<T, V> x = load_vec<T, V>(a.x + t * a.dim + d);
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] = m.x_coef * (a.scale * to_float(x.v[j]));
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] = 0.0f;
      }
      for (int i = 0; i < m.n_const; ++i) {
        const Vec<T, V> v = load_vec<T, V>(a.const_value + m.const_id[i] * a.dim + d);
        const float c = m.const_w[i] * m.a2[i];
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] += c * to_float(v.v[j]);
      }
      for (int f = 0; f < m.n_rows; ++f) {
        const Vec<T, V> y = load_vec<T, V>(a.y + int64_t(m.row[f]) * a.dim + d);
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] += m.row_w[f] * to_float(y.v[j]);
      }
      Vec<T, V> out;
#pragma unroll
      for (int j = 0; j < V; ++j) out.v[j] = from_float<T>(acc[j]);
      store_vec<T, V>(a.out + t * a.dim + d, out);
    }
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads) combine_backward_kernel(CombineArgs<T> a) {
  __shared__ float partial[kMaxDots][kWarps];
  __shared__ float dots[kMaxDots];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t t = blockIdx.x; t < a.tokens; t += gridDim.x) {
    const TokenMix m = token_mix(a, t);
    const int n_dots = 1 + m.n_const + m.n_rows;  // [x | constants | rows]
    float acc[kMaxDots];
    for (int i = 0; i < n_dots; ++i) acc[i] = 0.0f;
    for (int64_t d = int64_t(threadIdx.x) * V; d < a.dim; d += int64_t(kThreads) * V) {
      const Vec<T, V> g = load_vec<T, V>(a.dout + t * a.dim + d);
      if (m.uses_x()) {
        const Vec<T, V> x = load_vec<T, V>(a.x + t * a.dim + d);
#pragma unroll
        for (int j = 0; j < V; ++j) acc[0] += to_float(g.v[j]) * (a.scale * to_float(x.v[j]));
      }
      for (int i = 0; i < m.n_const; ++i) {
        const Vec<T, V> v = load_vec<T, V>(a.const_value + m.const_id[i] * a.dim + d);
#pragma unroll
        for (int j = 0; j < V; ++j) acc[1 + i] += to_float(g.v[j]) * to_float(v.v[j]);
      }
      for (int f = 0; f < m.n_rows; ++f) {
        const int64_t row = int64_t(m.row[f]) * a.dim + d;
        const Vec<T, V> y = load_vec<T, V>(a.y + row);
        Vec<T, V> dy;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          acc[1 + m.n_const + f] += to_float(g.v[j]) * to_float(y.v[j]);
          dy.v[j] = from_float<T>(m.row_w[f] * to_float(g.v[j]));
        }
        store_vec<T, V>(a.dy + row, dy);
      }
      Vec<T, V> dx;
#pragma unroll
      for (int j = 0; j < V; ++j) dx.v[j] = from_float<T>(a.scale * m.x_coef * to_float(g.v[j]));
      store_vec<T, V>(a.dx + t * a.dim + d, dx);
    }
    for (int i = 0; i < n_dots; ++i) {
      float v = acc[i];
      for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
      if (lane == 0) partial[i][warp] = v;
    }
    __syncthreads();
    if (threadIdx.x < n_dots) {
      float total = 0.0f;
      for (int w = 0; w < kWarps; ++w) total += partial[threadIdx.x][w];
      dots[threadIdx.x] = total;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      token_gradients(m, a.k, a.n_constant, dots[0], dots + 1, dots + 1 + m.n_const, a.dweights + t * a.k,
                      a.dmix + t * 2 * a.n_constant, a.v_coef + t * a.n_constant);
    }
    __syncthreads();
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
    combine_backward_kernel<T, decltype(width)::value>
        <<<blocks_for(a.tokens), kThreads, 0, cuda::as_stream(stream)>>>(a);
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
