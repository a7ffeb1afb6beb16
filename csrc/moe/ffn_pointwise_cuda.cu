// CUDA kernels of ffn_pointwise.h: grid-stride over (row, vector) pairs with
// 16-byte accesses when the row length and pointers allow, element accesses
// otherwise. The plan's row total is read on the device.
#include <algorithm>

#include "../cuda/cuda_utils.h"
#include "../cuda/vec.h"
#include "ffn_math.h"
#include "ffn_pointwise.h"
#include "indices.h"

namespace moepp::moe {

namespace {

using cuda::load_vec;
using cuda::store_vec;
using cuda::Vec;

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 8192;

int64_t blocks_for(int64_t work) { return std::max<int64_t>(1, std::min((work + kThreads - 1) / kThreads, kMaxBlocks)); }

__device__ int64_t clamp_rows(const int32_t* total, int64_t rows) {
  const int64_t m = *total;
  return m < 0 ? 0 : (m > rows ? rows : m);
}

template <typename T, int V>
__global__ void gather_kernel(GatherArgs<T> a) {
  const int64_t m = clamp_rows(a.total_rows, a.rows);
  const int64_t per_row = a.dim / V;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < m * per_row; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / per_row;
    const int64_t d = (i % per_row) * V;
    const int32_t slot = a.row_src[r];
    Vec<T, V> y;
    if (in_range(slot, a.tokens * a.top_k)) {
      const Vec<T, V> x = load_vec<T, V>(a.x + static_cast<int64_t>(slot / a.top_k) * a.dim + d);
#pragma unroll
      for (int j = 0; j < V; ++j) y.v[j] = from_float<T>(a.scale * to_float(x.v[j]));
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) y.v[j] = from_float<T>(0.0f);
    }
    store_vec<T, V>(a.out + r * a.dim + d, y);
  }
}

template <typename T, int V>
__global__ void swiglu_kernel(SwigluArgs<T> a) {
  const int64_t m = clamp_rows(a.total_rows, a.rows);
  const int64_t per_row = a.inner / V;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < m * per_row; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / per_row;
    const int64_t c = (i % per_row) * V;
    const T* h = a.h + r * 2 * a.inner;
    const Vec<T, V> gate = load_vec<T, V>(h + c);
    const Vec<T, V> up = load_vec<T, V>(h + a.inner + c);
    Vec<T, V> act;
    if (a.da == nullptr) {
#pragma unroll
      for (int j = 0; j < V; ++j) act.v[j] = from_float<T>(swiglu(to_float(gate.v[j]), to_float(up.v[j])));
    } else {
      const Vec<T, V> da = load_vec<T, V>(a.da + r * a.inner + c);
      Vec<T, V> dgate, dup;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        float av, dg, du;
        swiglu_backward(to_float(gate.v[j]), to_float(up.v[j]), to_float(da.v[j]), &av, &dg, &du);
        act.v[j] = from_float<T>(av);
        dgate.v[j] = from_float<T>(dg);
        dup.v[j] = from_float<T>(du);
      }
      store_vec<T, V>(a.dh + r * 2 * a.inner + c, dgate);
      store_vec<T, V>(a.dh + r * 2 * a.inner + a.inner + c, dup);
    }
    store_vec<T, V>(a.a + r * a.inner + c, act);
  }
}

template <typename T, int V>
__global__ void row_sum_kernel(RowSumArgs<T> a) {
  const int64_t per_row = a.dim / V;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < a.tokens * per_row;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / per_row;
    const int64_t d = (i % per_row) * V;
    float acc[V];
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] = 0.0f;
    for (int s = 0; s < a.top_k; ++s) {
      const int32_t row = a.slot_row[t * a.top_k + s];
      if (!in_range(row, a.tokens * a.top_k)) continue;
      const Vec<T, V> v = load_vec<T, V>(a.src + static_cast<int64_t>(row) * a.dim + d);
#pragma unroll
      for (int j = 0; j < V; ++j) acc[j] += to_float(v.v[j]);
    }
    Vec<T, V> out;
#pragma unroll
    for (int j = 0; j < V; ++j) out.v[j] = from_float<T>(a.scale * acc[j]);
    store_vec<T, V>(a.out + t * a.dim + d, out);
  }
}

}  // namespace

template <typename T>
void gather_rows_cuda(const GatherArgs<T>& a, int device, uintptr_t stream) {
  if (a.rows == 0 || a.dim == 0) return;
  cuda::DeviceGuard guard(device);
  const bool vec = a.dim % cuda::kVecWidth<T> == 0 && cuda::aligned16(a.x) && cuda::aligned16(a.out);
  cuda::with_vec_width<T>(vec, [&](auto width) {
    constexpr int V = decltype(width)::value;
    gather_kernel<T, V><<<blocks_for(a.rows * a.dim / V), kThreads, 0, cuda::as_stream(stream)>>>(a);
  });
  cuda::check(cudaGetLastError(), "gather kernel");
}

template <typename T>
void swiglu_cuda(const SwigluArgs<T>& a, int device, uintptr_t stream) {
  if (a.rows == 0 || a.inner == 0) return;
  cuda::DeviceGuard guard(device);
  const bool vec = a.inner % cuda::kVecWidth<T> == 0 && cuda::aligned16(a.h) && cuda::aligned16(a.a) &&
                   (a.da == nullptr || (cuda::aligned16(a.da) && cuda::aligned16(a.dh)));
  cuda::with_vec_width<T>(vec, [&](auto width) {
    constexpr int V = decltype(width)::value;
    swiglu_kernel<T, V><<<blocks_for(a.rows * a.inner / V), kThreads, 0, cuda::as_stream(stream)>>>(a);
  });
  cuda::check(cudaGetLastError(), "swiglu kernel");
}

template <typename T>
void row_sum_cuda(const RowSumArgs<T>& a, int device, uintptr_t stream) {
  if (a.tokens == 0 || a.dim == 0) return;
  cuda::DeviceGuard guard(device);
  const bool vec = a.dim % cuda::kVecWidth<T> == 0 && cuda::aligned16(a.src) && cuda::aligned16(a.out);
  cuda::with_vec_width<T>(vec, [&](auto width) {
    constexpr int V = decltype(width)::value;
    row_sum_kernel<T, V><<<blocks_for(a.tokens * a.dim / V), kThreads, 0, cuda::as_stream(stream)>>>(a);
  });
  cuda::check(cudaGetLastError(), "row sum kernel");
}

#define MOEPP_INSTANTIATE(T)                                              \
  template void gather_rows_cuda<T>(const GatherArgs<T>&, int, uintptr_t); \
  template void swiglu_cuda<T>(const SwigluArgs<T>&, int, uintptr_t);      \
  template void row_sum_cuda<T>(const RowSumArgs<T>&, int, uintptr_t);
MOEPP_INSTANTIATE(float)
MOEPP_INSTANTIATE(Half)
MOEPP_INSTANTIATE(BFloat16)
#undef MOEPP_INSTANTIATE

}  // namespace moepp::moe
