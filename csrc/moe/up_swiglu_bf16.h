// The CPU's fused first half of a bf16 expert FFN (spec: "Experts"), for every expert of a plan:
//   h[r] = scale * x[token(r)] · U_eᵀ   (bf16-rounded, written when asked)
//   a[r] = silu(h[r, :I]) * h[r, I:]    (from the rounded h, as swiglu_forward computes it)
// gather, GEMM 1 and SwiGLU in one pass with AVX512-BF16 dot products: x's rows are read where
// they are (no gathered copy), U_e is packed a 32-column panel at a time into the worker's
// cache, and the SwiGLU is the tile's epilogue. Needs D even and I a multiple of 32.
#pragma once

#include <cstdint>
#include <optional>

#include "../tensor_view.h"

namespace moepp::moe {

// Whether this build and CPU run the kernel (x86-64 with AVX512-BF16).
bool up_swiglu_bf16_supported();

// x [T, D], row_src [R] (slots; outside [0, T * top_k) a zero row), offsets [n_ffn + 1] (host),
// up [n_ffn, 2I, D], a [R, I], h [R, 2I]: all bf16 CPU tensors but the int32 indices. Rows past
// offsets[n_ffn] are not written.
void up_swiglu_bf16(const TensorView& x, const TensorView& row_src, const TensorView& offsets, const TensorView& up,
                    int top_k, float scale, const TensorView& a, const std::optional<TensorView>& h,
                    int num_threads);

}  // namespace moepp::moe
