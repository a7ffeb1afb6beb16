// The first CUDA call on each device checks that this build carries code that runs
// there (arch_support.h), so a GPU outside MOEPP_CUDA_ARCHS gets a clear error
// naming the setting instead of "no kernel image is available" from a launch.
#include <atomic>
#include <string>
#include <vector>

#include "arch_support.h"
#include "build_config.h"
#include "cuda_utils.h"

namespace moepp::cuda {

namespace {
constexpr int kMaxDevices = 64;
std::atomic<bool> g_supported[kMaxDevices];  // set once a device has passed
}  // namespace

std::vector<std::string> built_archs() { return split_archs(MOEPP_CUDA_ARCH_LIST); }

void require_supported_device(int device) {
  const bool cached = device >= 0 && device < kMaxDevices;
  if (cached && g_supported[device].load(std::memory_order_acquire)) return;
  int major = 0, minor = 0;
  check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "cudaDeviceGetAttribute");
  check(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device), "cudaDeviceGetAttribute");
  if (arch_support(major, minor, built_archs()) != ArchSupport::kNone) {
    if (cached) g_supported[device].store(true, std::memory_order_release);
    return;
  }
  cudaDeviceProp prop{};
  const std::string name = cudaGetDeviceProperties(&prop, device) == cudaSuccess ? prop.name : "the GPU";
  throw std::runtime_error(unsupported_device_message(name, device, major, minor, built_archs()));
}

}  // namespace moepp::cuda
