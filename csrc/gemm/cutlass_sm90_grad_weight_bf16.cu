// CUTLASS sm90 grouped GEMM family: grad_weight, bf16.
#include "cutlass_families.h"
#include "cutlass_sm90.cuh"

MOEPP_DEFINE_CUTLASS_FAMILY(sm90, grad_weight_bf16, cutlass::bfloat16_t, Product::kGradWeight)
