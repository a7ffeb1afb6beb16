// MOEPP_HD marks functions shared by the CPU twins and the CUDA kernels.
#pragma once

#if defined(__CUDACC__)
#define MOEPP_HD __host__ __device__ __forceinline__
#else
#define MOEPP_HD inline
#endif
