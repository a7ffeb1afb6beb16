// MOEPP_HD marks functions shared by the CPU twins and the CUDA kernels.
#pragma once

#if defined(__CUDACC__)
#define MOEPP_HD __host__ __device__ __forceinline__
#else
#define MOEPP_HD inline
#endif

// Full unrolling of a loop over a compile-time bound (kMaxTopK, kMaxSlots) in
// device code, so that per-slot arrays indexed by the loop variable live in
// registers, not in local memory. The CPU twins run the same loops rolled.
#if defined(__CUDA_ARCH__)
#define MOEPP_UNROLL _Pragma("unroll")
#else
#define MOEPP_UNROLL
#endif
