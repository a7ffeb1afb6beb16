// Vectors of V elements moved with one 16-byte (or narrower) access.
#pragma once

#include <cstdint>
#include <type_traits>

#include "../numeric.h"

namespace moepp::cuda {

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

// Elements per 16-byte access for T, when every pointer and the row length allow it.
template <typename T>
constexpr int kVecWidth = 16 / sizeof(T);

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T, int V>
__device__ __forceinline__ Vec<T, V> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, V>*>(p);
}

template <typename T, int V>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, V>& v) {
  *reinterpret_cast<Vec<T, V>*>(p) = v;
}

// Calls launch(width) with width = kVecWidth<T> (16-byte accesses) when
// `vectorizable`, else 1, as a std::integral_constant the kernel template takes.
template <typename T, typename F>
void with_vec_width(bool vectorizable, F&& launch) {
  if (vectorizable) {
    launch(std::integral_constant<int, kVecWidth<T>>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
}

}  // namespace moepp::cuda
