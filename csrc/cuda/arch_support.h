// Which code of a build runs on a GPU of compute capability major.minor, decided
// from the architectures the build compiled (MOEPP_CUDA_ARCHS, recorded in the
// module). Host logic only, so the CPU tests check every decision:
//   "80"   sm_80 code + compute_80 PTX: native on 8.x with x >= 0, PTX JIT on any
//          newer major (9.0, 10.x, 12.x);
//   "90a"  sm_90a code only (wgmma, TMA): 9.0 exactly;
//   "100f" family code: native on 10.x with x >= 0, no PTX.
// moepp_kernels needs compute capability 8.0 or newer (bf16 and cp.async everywhere).
#pragma once

#include <string>
#include <vector>

namespace moepp::cuda {

constexpr int kMinComputeMajor = 8;

struct Arch {
  int major = 0, minor = 0;
  char suffix = 0;  // 0, 'a' (architecture-specific) or 'f' (family-specific)
};

// "90a" -> {9, 0, 'a'}, "86" -> {8, 6, 0}, "120" -> {12, 0, 0}; false when malformed.
inline bool parse_arch(const std::string& text, Arch* out) {
  size_t digits = 0;
  while (digits < text.size() && text[digits] >= '0' && text[digits] <= '9') ++digits;
  const std::string suffix = text.substr(digits);
  if (digits < 2 || digits > 3 || !(suffix.empty() || suffix == "a" || suffix == "f")) return false;
  const int value = std::stoi(text.substr(0, digits));
  *out = Arch{value / 10, value % 10, suffix.empty() ? char(0) : suffix[0]};
  return true;
}

inline std::vector<std::string> split_archs(const std::string& list) {
  std::vector<std::string> out;
  size_t begin = 0;
  while (begin <= list.size()) {
    const size_t end = list.find_first_of(",;", begin);
    const std::string item = list.substr(begin, end == std::string::npos ? std::string::npos : end - begin);
    if (!item.empty()) out.push_back(item);
    if (end == std::string::npos) break;
    begin = end + 1;
  }
  return out;
}

enum class ArchSupport : int { kNone = 0, kPtx = 1, kNative = 2 };

inline ArchSupport arch_support(int major, int minor, const std::vector<std::string>& built) {
  if (major < kMinComputeMajor) return ArchSupport::kNone;
  ArchSupport best = ArchSupport::kNone;
  for (const std::string& text : built) {
    Arch a;
    if (!parse_arch(text, &a)) continue;
    const bool exact = a.major == major && a.minor == minor;
    const bool same_major_newer = a.major == major && minor >= a.minor;
    if (a.suffix == 'a' ? exact : same_major_newer) return ArchSupport::kNative;
    const bool ptx_runs = a.suffix == 0 && (major > a.major || same_major_newer);
    if (ptx_runs) best = ArchSupport::kPtx;
  }
  return best;
}

// The CUTLASS grouped-GEMM family to run: 90 (sm_90a code) on 9.0 only; else 80 (sm_80
// code on 8.x, its compute_80 PTX on newer GPUs); 0 when the build has neither.
inline int cutlass_family_for(int major, int minor, const std::vector<int>& families) {
  auto has = [&](int f) {
    for (int x : families) {
      if (x == f) return true;
    }
    return false;
  };
  if (major == 9 && minor == 0 && has(90)) return 90;
  if (major >= kMinComputeMajor && has(80)) return 80;
  return 0;
}

inline std::string join_archs(const std::vector<std::string>& built) {
  std::string out;
  for (const std::string& a : built) out += (out.empty() ? "" : ";") + a;
  return out;
}

// Empty when the build runs on the device; else what to tell the user.
inline std::string unsupported_device_message(const std::string& name, int device, int major, int minor,
                                              const std::vector<std::string>& built) {
  if (arch_support(major, minor, built) != ArchSupport::kNone) return "";
  const std::string cc = std::to_string(major) + "." + std::to_string(minor);
  const std::string head = "moepp_kernels: " + name + " (cuda:" + std::to_string(device) +
                           ") has compute capability " + cc + "; this build carries code for MOEPP_CUDA_ARCHS=\"" +
                           join_archs(built) + "\"";
  if (major < kMinComputeMajor) return head + ", and moepp_kernels needs compute capability 8.0 or newer";
  const std::string wanted = join_archs(built) + (built.empty() ? "" : ";") + std::to_string(major * 10 + minor);
  return head + ", none of which runs there: reinstall with MOEPP_CUDA_ARCHS=\"" + wanted +
         "\" (or the default, \"80;90a\", whose compute_80 PTX runs on every GPU from 8.0 up)";
}

}  // namespace moepp::cuda
