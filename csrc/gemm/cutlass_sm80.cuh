// CUTLASS 2.x grouped GEMM for sm80 (A100) with the device-only group
// scheduler: like the sm90 path, a small kernel writes each expert's problem
// size, pointers and leading dimensions from the plan's offsets, so nothing
// waits for the host. Tiles sized to fit 99 KB of shared memory (sm_86/89 too).
#pragma once

#include <string>

#include "../cuda/cuda_utils.h"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/device/gemm_grouped.h"
#include "cutlass/gemm/kernel/default_gemm_grouped.h"
#include "cutlass_layouts.h"
#include "grouped_gemm.h"

namespace moepp::gemm::sm80 {

template <typename Element, Product P>
struct GroupedGemm {
  static constexpr int kAlign = 8;
  using Kernel = typename cutlass::gemm::kernel::DefaultGemmGrouped<
      Element, typename Layouts<P>::A, cutlass::ComplexTransform::kNone, kAlign, Element, typename Layouts<P>::B,
      cutlass::ComplexTransform::kNone, kAlign, Element, cutlass::layout::RowMajor, float,
      cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, cutlass::gemm::GemmShape<128, 128, 32>,
      cutlass::gemm::GemmShape<64, 64, 32>, cutlass::gemm::GemmShape<16, 8, 16>,
      cutlass::epilogue::thread::LinearCombination<Element, kAlign, float, float>,
      cutlass::gemm::threadblock::GemmBatchedIdentityThreadblockSwizzle, 4,
      cutlass::gemm::kernel::GroupScheduleMode::kDeviceOnly>::GemmKernel;
  using Gemm = cutlass::gemm::device::GemmGrouped<Kernel>;

  struct Arrays {
    cutlass::gemm::GemmCoord* shapes;
    Element** a;
    Element** b;
    Element** d;
    int64_t* lda;
    int64_t* ldb;
    int64_t* ldd;
    int64_t bytes;
  };

  static Arrays carve(char* base, int groups) {
    Carver c{base, groups};
    Arrays r{};
    r.shapes = c.take<cutlass::gemm::GemmCoord>();
    r.a = c.take<Element*>();
    r.b = c.take<Element*>();
    r.d = c.take<Element*>();
    r.lda = c.take<int64_t>();
    r.ldb = c.take<int64_t>();
    r.ldd = c.take<int64_t>();
    r.bytes = c.at;
    return r;
  }

  static typename Gemm::Arguments arguments(const Arrays& r, int groups) {
    typename Gemm::EpilogueOutputOp::Params epilogue(1.0f, 0.0f);
    return typename Gemm::Arguments(r.shapes, groups, Gemm::sufficient(), epilogue, r.a, r.b, r.d, r.d, r.lda,
                                    r.ldb, r.ldd, r.ldd, nullptr);
  }

  static int64_t workspace_bytes(int groups) {
    const Arrays r = carve(nullptr, groups);
    return r.bytes + align256(static_cast<int64_t>(Gemm::get_workspace_size(arguments(r, groups))));
  }
};

template <typename G, typename Element, Product P>
__global__ void fill_arguments(typename G::Arrays r, int groups, const int32_t* offsets, int64_t rows, int32_t n,
                               int32_t k, const Element* a, const Element* b, Element* d) {
  const int g = blockIdx.x * blockDim.x + threadIdx.x;
  if (g >= groups) return;
  const GroupProblem p = group_problem(P, g, offsets, rows, n, k);
  r.shapes[g] = cutlass::gemm::GemmCoord(p.m, p.n, p.k);
  r.a[g] = const_cast<Element*>(a) + p.a_offset;
  r.b[g] = const_cast<Element*>(b) + p.b_offset;
  r.d[g] = d + p.d_offset;
  r.lda[g] = std::is_same_v<typename Layouts<P>::A, cutlass::layout::RowMajor> ? p.k : p.m_extent;
  r.ldb[g] = std::is_same_v<typename Layouts<P>::B, cutlass::layout::ColumnMajor> ? p.k : p.n;
  r.ldd[g] = p.n;
}

template <typename Element, Product P>
struct Family {
  using G = GroupedGemm<Element, P>;
  static int64_t workspace_bytes(int groups, int) { return G::workspace_bytes(groups); }
  static void run(bool, int groups, const int32_t* offsets, int64_t rows, int32_t n, int32_t k, const void* a,
                  const void* b, void* d, char* workspace, int, cudaStream_t stream) {
    const typename G::Arrays r = G::carve(workspace, groups);
    fill_arguments<G, Element, P><<<(groups + 127) / 128, 128, 0, stream>>>(
        r, groups, offsets, rows, n, k, static_cast<const Element*>(a), static_cast<const Element*>(b),
        static_cast<Element*>(d));
    cuda::check(cudaGetLastError(), "grouped GEMM argument kernel");
    typename G::Gemm gemm;
    const auto args = G::arguments(r, groups);
    auto status = gemm.initialize(args, workspace + r.bytes, stream);
    if (status == cutlass::Status::kSuccess) status = gemm.run(stream);
    if (status != cutlass::Status::kSuccess) {
      throw std::runtime_error(std::string("CUTLASS sm80 grouped GEMM failed: ") + cutlassGetStatusString(status));
    }
  }
};

}  // namespace moepp::gemm::sm80
