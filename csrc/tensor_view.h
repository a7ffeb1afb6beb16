// A torch-free description of a tensor handed over from Python: data pointer,
// shape, strides (in elements), dtype and device. The Python layer validates
// the torch tensor and builds the view; the checks here are the last line of
// defence and throw std::invalid_argument naming the argument.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>

namespace moepp {

enum class DType : int32_t {
  kFloat32 = 0,
  kFloat64 = 1,
  kFloat16 = 2,
  kBFloat16 = 3,
  kInt32 = 4,
  kInt64 = 5,
  kUInt8 = 6,
};
enum class DeviceType : int32_t { kCPU = 0, kCUDA = 1 };

constexpr int kMaxDims = 4;

const char* dtype_name(DType dtype);

struct TensorView {
  void* data = nullptr;
  int32_t ndim = 0;
  int64_t shape[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};
  DType dtype = DType::kFloat32;
  DeviceType device = DeviceType::kCPU;
  int32_t device_index = -1;

  int64_t size(int dim) const { return shape[dim]; }
  int64_t numel() const;
  bool is_contiguous() const;
  template <typename T>
  T* ptr() const { return static_cast<T*>(data); }
};

[[noreturn]] void throw_invalid(const std::string& name, const std::string& what);

// Throws unless `view` has `dtype`, exactly `shape` (-1 matches any extent), is
// contiguous, and lives on `device` / `device_index`.
void check_view(const TensorView& view, const char* name, DType dtype, std::initializer_list<int64_t> shape,
                DeviceType device, int32_t device_index);

}  // namespace moepp
