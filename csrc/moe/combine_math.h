// Per-token math of the combine epilogue (spec: "Experts", "Combine"), shared
// by the CPU twin and the CUDA kernels. One token's k slots reduce to
//   out = x_coef * x_e + sum_c v_coef[c] * v_c + sum_f row_w[f] * y[row[f]]
// where copy slots add their gate to x_coef, a constant slot c adds gate * a1
// to x_coef and gate * a2 to v_coef (a = softmax of its two mixing logits), FFN
// slots point at their permuted row, and zero slots (and ids out of range)
// contribute nothing: they never read x, y or v.
#pragma once

#include <cmath>
#include <cstdint>

#include "../macros.h"
#include "indices.h"

namespace moepp::moe {

constexpr int kMaxSlots = 16;

struct ExpertLayout {
  int32_t n_ffn;
  int32_t const_begin;  // == n_ffn
  int32_t copy_begin;
  int32_t zero_begin;
  int32_t n_experts;
};

struct TokenMix {
  float x_coef;
  int n_rows;
  int32_t row[kMaxSlots];
  float row_w[kMaxSlots];
  int row_slot[kMaxSlots];
  int n_const;
  int32_t const_id[kMaxSlots];  // index among the constant experts
  float const_w[kMaxSlots];     // the slot's gate
  float a1[kMaxSlots];
  float a2[kMaxSlots];
  int const_slot[kMaxSlots];
  int copy_slot[kMaxSlots];
  int n_copy;
  // Only copy and constant slots read x_e: a token routed to zero experts alone
  // gives exactly 0, even where x is NaN.
  MOEPP_HD bool uses_x() const { return n_copy + n_const > 0; }
};

// ids, weights, slot_row: the token's k entries (slot rows index y's `rows`); mix: its [2 * n_constant] fp32
// mixing logits (x_e · W_cᵀ). The CUDA kernels build `m` once per token in
// shared memory (its arrays are indexed at run time), the CPU twin on its stack.
MOEPP_HD void analyze_token(const ExpertLayout& layout, int k, const int32_t* ids, const float* weights,
                            const int32_t* slot_row, int64_t rows, const float* mix, TokenMix& m) {
  m.x_coef = 0.0f;
  m.n_rows = 0;
  m.n_const = 0;
  m.n_copy = 0;
  for (int j = 0; j < k; ++j) {
    const int32_t e = ids[j];
    const float w = weights[j];
    if (e >= 0 && e < layout.n_ffn) {
      if (!in_range(slot_row[j], rows)) continue;  // no row (or one outside y's rows): nothing to add
      m.row[m.n_rows] = slot_row[j];
      m.row_w[m.n_rows] = w;
      m.row_slot[m.n_rows++] = j;
    } else if (e >= layout.const_begin && e < layout.copy_begin) {
      const int c = e - layout.const_begin;
      const float l1 = mix[2 * c], l2 = mix[2 * c + 1];
      const float mx = l1 > l2 ? l1 : l2;
      const float e1 = std::exp(l1 - mx), e2 = std::exp(l2 - mx);
      const float a1 = e1 / (e1 + e2), a2 = e2 / (e1 + e2);
      m.x_coef += w * a1;
      m.const_id[m.n_const] = c;
      m.const_w[m.n_const] = w;
      m.a1[m.n_const] = a1;
      m.a2[m.n_const] = a2;
      m.const_slot[m.n_const++] = j;
    } else if (e >= layout.copy_begin && e < layout.zero_begin) {
      m.x_coef += w;
      m.copy_slot[m.n_copy++] = j;
    }
  }
}

// The gradients that need a reduction over the hidden dim, from the token's dot
// products: dot_x = dout·x_e, dot_v[i] = dout·v of constant slot i, dot_y[f] =
// dout·y[row f]. Writes dweights [k], dmix [2 * n_constant] and v_coef
// [n_constant] (gate * a2 per constant expert: dv = v_coefᵀ · dout).
MOEPP_HD void token_gradients(const TokenMix& m, int k, int n_constant, float dot_x, const float* dot_v,
                              const float* dot_y, float* dweights, float* dmix, float* v_coef) {
  for (int j = 0; j < k; ++j) dweights[j] = 0.0f;
  for (int c = 0; c < 2 * n_constant; ++c) dmix[c] = 0.0f;
  for (int c = 0; c < n_constant; ++c) v_coef[c] = 0.0f;
  for (int f = 0; f < m.n_rows; ++f) dweights[m.row_slot[f]] = dot_y[f];
  for (int i = 0; i < m.n_copy; ++i) dweights[m.copy_slot[i]] = dot_x;
  for (int i = 0; i < m.n_const; ++i) {
    const float a1 = m.a1[i], a2 = m.a2[i], w = m.const_w[i];
    dweights[m.const_slot[i]] = a1 * dot_x + a2 * dot_v[i];
    const float g1 = w * dot_x, g2 = w * dot_v[i];
    const float ga = a1 * g1 + a2 * g2;  // softmax backward over the two mixing logits
    dmix[2 * m.const_id[i]] = a1 * (g1 - ga);
    dmix[2 * m.const_id[i] + 1] = a2 * (g2 - ga);
    v_coef[m.const_id[i]] = w * a2;
  }
}

}  // namespace moepp::moe
