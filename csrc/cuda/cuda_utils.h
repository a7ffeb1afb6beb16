// Small helpers shared by the CUDA launchers: error checks that throw, a
// device guard, and the dynamic shared-memory opt-in.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>

#include "shared_memory.h"

namespace moepp::cuda {

inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

// Throws a clear error when this build carries no code that runs on `device`
// (device_check.cu; checked once per device, then cached).
void require_supported_device(int device);

// Makes `device` current for the scope and restores the caller's device after;
// every launcher starts with one, so it also runs the device check.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    require_supported_device(device);
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    int current = previous_;
    if (cudaGetDevice(&current) == cudaSuccess && current != previous_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

inline cudaStream_t as_stream(uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

// The device's per-block shared memory opt-in limit (227 KB on sm_90, 163 KB on sm_80).
inline size_t optin_shared_memory() {
  int device = 0, bytes = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
        "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
  return static_cast<size_t>(bytes);
}

// What bounds a kernel's dynamic shared memory on the current device.
struct KernelSharedMemory {
  size_t static_bytes;     // cudaFuncGetAttributes: sharedSizeBytes
  size_t current_dynamic;  // its MaxDynamicSharedMemorySize now
  size_t optin;            // the device's per-block opt-in limit
  size_t budget() const { return dynamic_shared_budget(optin, static_bytes); }
};

// One entry per (kernel, device), read once: the static size and the opt-in limit
// never change, and the attribute changes only through allow_shared_memory, which
// updates the entry. Launches then cost no driver queries.
class SharedMemoryCache {
 public:
  static SharedMemoryCache& instance() {
    static SharedMemoryCache cache;
    return cache;
  }
  KernelSharedMemory get(const void* kernel) {
    int device = 0;
    check(cudaGetDevice(&device), "cudaGetDevice");
    std::lock_guard<std::mutex> lock(mutex_);
    auto found = entries_.find({kernel, device});
    if (found != entries_.end()) return found->second;
    cudaFuncAttributes attr{};
    check(cudaFuncGetAttributes(&attr, kernel), "cudaFuncGetAttributes");
    const KernelSharedMemory info{attr.sharedSizeBytes, static_cast<size_t>(attr.maxDynamicSharedSizeBytes),
                                  optin_shared_memory()};
    entries_.emplace(std::make_pair(kernel, device), info);
    return info;
  }
  // Raises the kernel's MaxDynamicSharedMemorySize (never lowers it).
  void raise(const void* kernel, size_t bytes) {
    int device = 0;
    check(cudaGetDevice(&device), "cudaGetDevice");
    std::lock_guard<std::mutex> lock(mutex_);
    KernelSharedMemory& info = entries_.at({kernel, device});
    if (bytes <= info.current_dynamic) return;
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
          "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
    info.current_dynamic = bytes;
  }

 private:
  std::mutex mutex_;
  std::map<std::pair<const void*, int>, KernelSharedMemory> entries_;
};

template <typename Kernel>
KernelSharedMemory shared_memory_of(Kernel kernel) {
  return SharedMemoryCache::instance().get(reinterpret_cast<const void*>(kernel));
}

// Lets `kernel` be launched with `bytes` of dynamic shared memory (throws when
// the device cannot give it that much next to its static shared memory).
template <typename Kernel>
void allow_shared_memory(Kernel kernel, const KernelSharedMemory& info, size_t bytes) {
  const DynamicSharedPlan plan = plan_dynamic_shared(bytes, info.static_bytes, info.optin, info.current_dynamic);
  if (!plan.fits) {
    throw std::runtime_error("kernel needs " + std::to_string(bytes) + " bytes of dynamic shared memory; the device "
                             "allows " + std::to_string(plan.budget) + " next to its " +
                             std::to_string(info.static_bytes) + " static bytes");
  }
  if (plan.attribute >= 0) {
    SharedMemoryCache::instance().raise(reinterpret_cast<const void*>(kernel), static_cast<size_t>(plan.attribute));
  }
}

template <typename Kernel>
void allow_shared_memory(Kernel kernel, size_t bytes) {
  allow_shared_memory(kernel, shared_memory_of(kernel), bytes);
}

}  // namespace moepp::cuda
