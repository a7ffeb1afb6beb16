// MOEPP_HD marks functions shared by the CPU twins and the CUDA kernels.
#pragma once

#if defined(__CUDACC__)
#define MOEPP_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Always inlined on the host too, as on the device: a CPU twin's row loop is compiled
// per instruction set (target_clones), and a shared helper left out of line is compiled
// once for the baseline and called (measured: the router's gates of the k chosen experts,
// a scalar exp without FMA per slot, were a quarter of the N = 768, k = 12 forward).
#define MOEPP_HD inline __attribute__((always_inline))
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
