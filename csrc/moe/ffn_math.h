// Element math of the FFN experts shared by the CPU twins and CUDA kernels
// (spec: "Experts": y = (silu(gate) * up) @ V_eᵀ, [gate | up] = x_e @ U_eᵀ).
#pragma once

#include <cstdint>

#include "../macros.h"
#include "../numeric.h"

namespace moepp::moe {

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
