// CUTLASS sm90 grouped GEMM family: grad_weight, fp16.
#include "cutlass_families.h"
#include "cutlass_sm90.cuh"

MOEPP_DEFINE_CUTLASS_FAMILY(sm90, grad_weight_fp16, cutlass::half_t, Product::kGradWeight)
