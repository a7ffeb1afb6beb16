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

MOEPP_HD float to_float(Half v) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(v.bits));
#else
  const uint32_t sign = static_cast<uint32_t>(v.bits & 0x8000u) << 16;
  uint32_t exponent = (v.bits >> 10) & 0x1fu;
  uint32_t mantissa = v.bits & 0x3ffu;
  if (exponent == 0x1fu) return bits_float(sign | 0x7f800000u | (mantissa << 13));  // inf / NaN
  if (exponent == 0) {
    if (mantissa == 0) return bits_float(sign);
    // subnormal: normalise the mantissa
    exponent = 113;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    mantissa &= 0x3ffu;
    return bits_float(sign | (exponent << 23) | (mantissa << 13));
  }
  return bits_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
#endif
}

MOEPP_HD Half to_half(float v) {
#if defined(__CUDA_ARCH__)
  return Half{__half_as_ushort(__float2half_rn(v))};
#else
  const uint32_t u = float_bits(v);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return Half{static_cast<uint16_t>(sign | 0x7e00u)};  // NaN
  if (abs >= 0x477ff000u) return Half{static_cast<uint16_t>(sign | 0x7c00u)};  // rounds to inf
  if (abs < 0x38800000u) {
    // result is subnormal (or zero): shift the implicit-1 mantissa into place, round to nearest even
    const int shift = 126 - static_cast<int>(abs >> 23);
    if (shift > 24) return Half{sign};
    const uint32_t mantissa = (abs & 0x7fffffu) | 0x800000u;
    const uint32_t half_mantissa = mantissa >> shift;
    const uint32_t rest = mantissa & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1);
    uint32_t result = half_mantissa;
    if (rest > halfway || (rest == halfway && (half_mantissa & 1u))) ++result;
    return Half{static_cast<uint16_t>(sign | result)};
  }
  // normal: rebias the exponent, round the mantissa to 10 bits (nearest even)
  const uint32_t rebased = abs - (112u << 23);
  const uint32_t rounding = 0xfffu + ((rebased >> 13) & 1u);
  return Half{static_cast<uint16_t>(sign | ((rebased + rounding) >> 13))};
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

}  // namespace moepp
