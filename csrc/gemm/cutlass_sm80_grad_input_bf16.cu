// CUTLASS sm80 grouped GEMM family: grad_input, bf16.
#include "cutlass_families.h"
#include "cutlass_sm80.cuh"

MOEPP_DEFINE_CUTLASS_FAMILY(sm80, grad_input_bf16, cutlass::bfloat16_t, Product::kGradInput)
