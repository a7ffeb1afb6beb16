#include "tensor_view.h"

#include <sstream>

namespace moepp {

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "float32";
    case DType::kFloat64: return "float64";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kInt32: return "int32";
    case DType::kInt64: return "int64";
    case DType::kUInt8: return "uint8";
  }
  return "unknown";
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int d = 0; d < ndim; ++d) n *= shape[d];
  return n;
}

bool TensorView::is_contiguous() const {
  if (numel() == 0) return true;
  int64_t expected = 1;
  for (int d = ndim - 1; d >= 0; --d) {
    if (shape[d] != 1 && strides[d] != expected) return false;
    expected *= shape[d];
  }
  return true;
}

void throw_invalid(const std::string& name, const std::string& what) {
  throw std::invalid_argument(name + ": " + what);
}

void check_view(const TensorView& view, const char* name, DType dtype, std::initializer_list<int64_t> shape,
                DeviceType device, int32_t device_index) {
  if (view.dtype != dtype) {
    throw_invalid(name, std::string("expected dtype ") + dtype_name(dtype) + ", got " + dtype_name(view.dtype));
  }
  if (view.ndim != static_cast<int32_t>(shape.size())) {
    throw_invalid(name, "expected " + std::to_string(shape.size()) + " dimensions, got " + std::to_string(view.ndim));
  }
  int d = 0;
  for (int64_t extent : shape) {
    if (extent >= 0 && view.shape[d] != extent) {
      std::ostringstream msg;
      msg << "expected size " << extent << " in dimension " << d << ", got " << view.shape[d];
      throw_invalid(name, msg.str());
    }
    ++d;
  }
  if (!view.is_contiguous()) throw_invalid(name, "must be contiguous");
  if (view.device != device || (device == DeviceType::kCUDA && view.device_index != device_index)) {
    throw_invalid(name, "is on a different device than the other arguments");
  }
  if (view.data == nullptr && view.numel() > 0) throw_invalid(name, "has a null data pointer");
}

}  // namespace moepp
