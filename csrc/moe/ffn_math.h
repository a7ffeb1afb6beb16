// Element math of the FFN experts shared by the CPU twins and CUDA kernels
// (spec: "Experts": y = (silu(gate) * up) @ V_eᵀ, [gate | up] = x_e @ U_eᵀ).
#pragma once

#include <cstdint>

#include "../macros.h"
#include "../numeric.h"

namespace moepp::moe {

// e^x without a libm call, so the CPU loops vectorise (and CPU and GPU compute it the
// same way, up to nvcc contracting multiply-adds):
// x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two for exact products), e^r by its
// degree-7 Taylor-like minimax polynomial (Cephes expf, about 1 ulp), 2^n built in the
// exponent bits. Above 88 it is +inf, below -87 it is 0 (true values beyond fp32's normal
// range); NaN stays NaN.
MOEPP_HD float exp_approx(float x) {
  // Each comparison stands alone (no nested selects): the compiler may then evaluate them all
  // and vectorise, which it will not do for a float comparison that runs conditionally.
  const float upper = x > 88.0f ? 88.0f : x;
  const float c = upper < -87.0f ? -87.0f : upper;
  const float round_magic = 12582912.0f;  // 1.5 * 2^23: the sum's low mantissa bits hold round(c / ln2)
  const float t = c * 1.44269504088896341f + round_magic;
  const float n = t - round_magic;
  const float r = (c - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float er = p * r * r + r + 1.0f;
  const uint32_t two_n = (float_bits(t) - float_bits(round_magic) + 127u) << 23;
  const float y = er * bits_float(two_n);
  const float overflowed = x > 88.0f ? bits_float(0x7f800000u) : y;
  return x < -87.0f ? 0.0f : overflowed;
}

MOEPP_HD float sigmoid(float g) { return 1.0f / (1.0f + exp_approx(-g)); }

MOEPP_HD float swiglu(float gate, float up) { return gate * sigmoid(gate) * up; }

// a = silu(gate) * up and its gradients from da.
// d silu(g)/dg = s * (1 + g * (1 - s)) with s = sigmoid(g).
MOEPP_HD void swiglu_backward(float gate, float up, float da, float* a, float* dgate, float* dup) {
  const float s = sigmoid(gate);
  const float silu = gate * s;
  *a = silu * up;
  *dup = da * silu;
  *dgate = da * up * s * (1.0f + gate * (1.0f - s));
}

}  // namespace moepp::moe
