// fp16 / bf16 storage types usable on the host and the device without torch:
// 16-bit payloads with round-to-nearest-even conversions to and from float
// (the rounding torch uses). Kernels load, compute in float, store once.
#pragma once

#include <cstdint>
#include <cstring>

#include "macros.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace moepp {

struct alignas(2) BFloat16 {
  uint16_t bits;
};
struct alignas(2) Half {
  uint16_t bits;
};

MOEPP_HD uint32_t float_bits(float v) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(v);
#else
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return u;
#endif
}

MOEPP_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float v;
  std::memcpy(&v, &u, 4);
  return v;
#endif
}

MOEPP_HD float to_float(float v) { return v; }
MOEPP_HD float to_float(double v) { return static_cast<float>(v); }

MOEPP_HD float to_float(BFloat16 v) { return bits_float(static_cast<uint32_t>(v.bits) << 16); }

MOEPP_HD BFloat16 to_bfloat16(float v) {
  const uint32_t u = float_bits(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) return BFloat16{static_cast<uint16_t>((u >> 16) | 0x40u)};  // quiet NaN
  const uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
  return BFloat16{static_cast<uint16_t>((u + rounding) >> 16)};
}

// The host conversions below use selects only (no branches, no loops), so the CPU
// loops that call them vectorise; every input is converted exactly as the device does.

// half -> float, exact: normal numbers rebias the exponent (15 -> 127), inf / NaN keep
// an all-ones exponent (and the NaN payload), subnormals are their mantissa times 2^-24.
MOEPP_HD float to_float(Half v) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(v.bits));
#else
  const uint32_t sign = static_cast<uint32_t>(v.bits & 0x8000u) << 16;
  const uint32_t body = static_cast<uint32_t>(v.bits & 0x7fffu) << 13;  // exponent and mantissa, float-aligned
  const uint32_t exponent = body & 0x0f800000u;
  const uint32_t normal = body + (112u << 23);
  const uint32_t special = normal + (112u << 23);
  // 2^-14 * (1 + m / 1024) - 2^-14 = m * 2^-24, exactly
  const uint32_t subnormal = float_bits(bits_float(body + (113u << 23)) - bits_float(113u << 23));
  const uint32_t out = exponent == 0 ? subnormal : (exponent == 0x0f800000u ? special : normal);
  return bits_float(sign | out);
#endif
}

// float -> half, round to nearest even: normal results drop 13 mantissa bits with the
// usual rounding increment; subnormal ones (|v| < 2^-14) let the float adder round:
// |v| + 0.5 has a unit in the last place of 2^-24, the half subnormal spacing.
MOEPP_HD Half to_half(float v) {
#if defined(__CUDA_ARCH__)
  return Half{__half_as_ushort(__float2half_rn(v))};
#else
  const uint32_t u = float_bits(v);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t abs = u & 0x7fffffffu;
  const uint32_t normal = (abs - (112u << 23) + 0xfffu + ((abs >> 13) & 1u)) >> 13;
  const uint32_t subnormal = float_bits(bits_float(abs) + 0.5f) - float_bits(0.5f);
  uint32_t out = abs < (113u << 23) ? subnormal : normal;
  out = abs >= 0x477ff000u ? 0x7c00u : out;  // rounds to inf
  out = abs > 0x7f800000u ? 0x7e00u : out;   // NaN: the quiet one
  return Half{static_cast<uint16_t>(sign | out)};
#endif
}

template <typename T>
MOEPP_HD T from_float(float v);
template <>
MOEPP_HD float from_float<float>(float v) { return v; }
template <>
MOEPP_HD BFloat16 from_float<BFloat16>(float v) { return to_bfloat16(v); }
template <>
MOEPP_HD Half from_float<Half>(float v) { return to_half(v); }

// e^x without a libm call, so the CPU loops vectorise (and CPU and GPU compute it the
// same way, up to nvcc contracting multiply-adds):
// x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two for exact products), e^r by its
// degree-7 Taylor-like minimax polynomial (Cephes expf, about 1 ulp), 2^n built in the
// exponent bits. Above 88 it is +inf, below -87 it is 0 (true values beyond fp32's normal
// range); NaN stays NaN. kNonPositive: the caller's x is never above 0 (a softmax's
// x - max), so the overflow's clamp and select, which never act there, are left out.
template <bool kNonPositive = false>
MOEPP_HD float exp_approx(float x) {
  // Each comparison stands alone (no nested selects): the compiler may then evaluate them all
  // and vectorise, which it will not do for a float comparison that runs conditionally.
  const float upper = kNonPositive || !(x > 88.0f) ? x : 88.0f;
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
  const float overflowed = !kNonPositive && x > 88.0f ? bits_float(0x7f800000u) : y;
  return x < -87.0f ? 0.0f : overflowed;
}

}  // namespace moepp
