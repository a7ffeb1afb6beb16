// CUTLASS sm80 grouped GEMM family: forward, fp16.
#include "cutlass_families.h"
#include "cutlass_sm80.cuh"

MOEPP_DEFINE_CUTLASS_FAMILY(sm80, forward_fp16, cutlass::half_t, Product::kForward)
