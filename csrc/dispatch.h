// The one dtype dispatch of the package: MOEPP_DISPATCH(dtype, "arg", (T1, T2, ...), scalar_t, body)
// runs `body` with `scalar_t` bound to the C++ type matching `dtype`, and throws
// std::invalid_argument naming "arg" when `dtype` is not in the list.
#pragma once

#include <string>

#include "numeric.h"
#include "tensor_view.h"

namespace moepp {

template <typename T>
struct DTypeOf;
template <>
struct DTypeOf<float> { static constexpr DType value = DType::kFloat32; };
template <>
struct DTypeOf<double> { static constexpr DType value = DType::kFloat64; };
template <>
struct DTypeOf<Half> { static constexpr DType value = DType::kFloat16; };
template <>
struct DTypeOf<BFloat16> { static constexpr DType value = DType::kBFloat16; };
template <>
struct DTypeOf<int32_t> { static constexpr DType value = DType::kInt32; };
template <>
struct DTypeOf<int64_t> { static constexpr DType value = DType::kInt64; };

template <typename T>
struct TypeTag { using type = T; };

template <typename... Ts, typename F>
void dispatch_dtype(DType dtype, const char* name, F&& body) {
  const bool matched = ((dtype == DTypeOf<Ts>::value ? (body(TypeTag<Ts>{}), true) : false) || ...);
  if (!matched) throw_invalid(name, std::string("unsupported dtype ") + dtype_name(dtype));
}

}  // namespace moepp

#define MOEPP_UNPAREN(...) __VA_ARGS__
#define MOEPP_DISPATCH(DTYPE, NAME, TYPES, SCALAR, ...)                               \
  ::moepp::dispatch_dtype<MOEPP_UNPAREN TYPES>((DTYPE), (NAME), [&](auto moepp_tag_) { \
    using SCALAR = typename decltype(moepp_tag_)::type;                                 \
    __VA_ARGS__                                                                         \
  })
