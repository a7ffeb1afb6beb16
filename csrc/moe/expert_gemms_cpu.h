// The CPU's own GEMM kernels for the FFN experts (spec: "Experts"), bf16 or fp32, every expert of
// a plan in one call; the forward's:
//   up_swiglu_cpu:  h[r] = scale * x[token(r)] · U_eᵀ   (rounded to x's dtype, written when asked)
//                   a[r] = silu(h[r, :I]) * h[r, I:]    (from the rounded h, as swiglu_forward computes it)
//   down_cpu:       y[r] = a[r] · V_eᵀ
// for the rows r of expert e. Tiles of 6 rows by a 64-column panel of the weight's rows (U_e's
// 32 gate rows and the matching up rows; 64 rows of V_e), 24 AVX-512 accumulators: vdpbf16ps
// dot products of bf16 pairs, or fp32 FMAs (fp32, and bf16 widened where the CPU has no
// vdpbf16ps: each expert's rows widened into an fp32 buffer, the panels packed as fp32). Rows
// are otherwise read where they are (x's through row_src: no gathered copy); each panel is
// packed into the worker's cache just before its rows run; the SwiGLU is the first kernel's
// epilogue. x (a) and the weights share one dtype; I is a multiple of 32 and, in bf16, D is
// even. Rows past offsets[n_ffn] are not written.
#pragma once

#include <cstdint>
#include <optional>

#include "../tensor_view.h"

namespace moepp::moe {

// Whether this build and CPU run the kernels: x86-64 with AVX-512 F/BW/VL/DQ (Skylake-X and
// later, Zen 4 and later), for both dtypes.
bool expert_gemms_cpu_supported();

// Whether bf16 runs as pairs through vdpbf16ps (AVX512-BF16: Zen 4, Intel from Cooper Lake; the
// default wherever the CPU has it) or widened to fp32 for fp32 FMAs (other AVX-512 CPUs, or
// switched so by set_expert_gemms_cpu_bf16_pairs(false)). Their fp32 sums differ as two summation
// orders do (and vdpbf16ps takes bf16 denormals as zeros).
bool expert_gemms_cpu_bf16_pairs();
void set_expert_gemms_cpu_bf16_pairs(bool enabled);  // enabled without AVX512-BF16: std::invalid_argument

// x [T, D], row_src [R] (slots; outside [0, T * top_k) a zero row), offsets [n_ffn + 1] (host),
// up [n_ffn, 2I, D], a [R, I], h [R, 2I]: CPU tensors of one dtype (bf16 or fp32) but the int32
// indices.
void up_swiglu_cpu(const TensorView& x, const TensorView& row_src, const TensorView& offsets, const TensorView& up,
                   int top_k, float scale, const TensorView& a, const std::optional<TensorView>& h, int num_threads);

// a [R, I], offsets [n_ffn + 1] (host), down [n_ffn, D, I], y [R, D]: CPU tensors of one dtype.
void down_cpu(const TensorView& a, const TensorView& offsets, const TensorView& down, const TensorView& y,
              int num_threads);

// The backward's products of the rows with the weights:
// swiglu_grad_cpu: da = dy[r] · V_e (rounded to the dtype), then dh and a from h and da as
//   swiglu_backward computes them; dy [R, D], down [n_ffn, D, I], h and dh [R, 2I], a [R, I].
// up_grad_input_cpu: dx[r] = dh[r] · U_e; dh [R, 2I], up [n_ffn, 2I, D], dx [R, D].
// V_e and U_e are read along their rows here (the weights' columns are the outputs): packed 64
// columns at a time.
void swiglu_grad_cpu(const TensorView& dy, const TensorView& offsets, const TensorView& down, const TensorView& h,
                     const TensorView& dh, const TensorView& a, int num_threads);
void up_grad_input_cpu(const TensorView& dh, const TensorView& offsets, const TensorView& up, const TensorView& dx,
                       int num_threads);

// The weight gradients, every expert's in one call: out[e] = scale * lhs_eᵀ · rhs_e over the
// rows of expert e (K: the expert's rows, in chunks of 256), zero for an expert without
// rows; d V = dyᵀ · a and d U = scale * dhᵀ · x[token(r)]:
// lhs [R, n1]; rhs [R, n2], or with rhs_src [R] (slots) rhs [T, n2] read through it (row r:
// rhs[rhs_src[r] / top_k], a zero row outside [0, T * top_k)); out [n_ffn, n1, n2]; one dtype.
// Always fp32 FMAs (bf16 widened, where the CPU has vdpbf16ps too); lhs's rows are transposed per
// expert, rhs's packed 64 columns at a time.
void weight_grad_cpu(const TensorView& lhs, const TensorView& rhs, const std::optional<TensorView>& rhs_src,
                     const TensorView& offsets, int top_k, float scale, const TensorView& out, int num_threads);

}  // namespace moepp::moe
