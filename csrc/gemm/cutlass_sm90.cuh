// CUTLASS 3.x sm90 ptr-array grouped GEMM (TMA, warp-specialised, wgmma) with
// device-side problem shapes: a small kernel writes each expert's shape,
// pointers and strides from the plan's offsets, then CUTLASS runs the group.
// Included by one translation unit per (product, dtype) so 2 cores compile it.
#pragma once

#include <algorithm>
#include <string>

#include "../cuda/cuda_utils.h"
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"
#include "cutlass_layouts.h"
#include "grouped_gemm.h"

namespace moepp::gemm::sm90 {

using namespace cute;
using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;

// Two tile configurations: large M (prefill, training) and small M (decode).
struct LargeTile {
  using Tile = Shape<_128, _128, _64>;
  using Cluster = Shape<_1, _1, _1>;
  using Kernel = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
  using Epilogue = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
};
struct SmallTile {
  using Tile = Shape<_64, _128, _64>;
  using Cluster = Shape<_1, _1, _1>;
  using Kernel = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong;
  using Epilogue = cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong;
};

template <typename Element, Product P, typename Config>
struct GroupedGemm {
  using LayoutC = cutlass::layout::RowMajor;
  static constexpr int kAlign = 128 / cutlass::sizeof_bits<Element>::value;
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, typename Config::Tile, typename Config::Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, Element, LayoutC*, kAlign, Element, LayoutC*,
      kAlign, typename Config::Epilogue, cutlass::epilogue::fusion::LinearCombination<Element, float>>::CollectiveOp;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, typename Layouts<P>::A*, kAlign, Element,
      typename Layouts<P>::B*, kAlign, float, typename Config::Tile, typename Config::Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      typename Config::Kernel>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
  using Shape3 = typename ProblemShape::UnderlyingProblemShape;

  // The argument arrays at the start of the workspace; CUTLASS's own workspace follows.
  struct Arrays {
    Shape3* shapes;
    const Element** a;
    const Element** b;
    Element** d;
    StrideA* sa;
    StrideB* sb;
    StrideD* sd;
    int64_t bytes;
  };

  static Arrays carve(char* base, int groups) {
    Carver c{base, groups};
    Arrays r{};
    r.shapes = c.take<Shape3>();
    r.a = c.take<const Element*>();
    r.b = c.take<const Element*>();
    r.d = c.take<Element*>();
    r.sa = c.take<StrideA>();
    r.sb = c.take<StrideB>();
    r.sd = c.take<StrideD>();
    r.bytes = c.at;
    return r;
  }

  static typename Gemm::Arguments arguments(const Arrays& r, int groups, int device) {
    cutlass::KernelHardwareInfo hw;
    hw.device_id = device;
    hw.sm_count = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
    typename Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGrouped,
                                  {groups, r.shapes, nullptr},
                                  {r.a, r.sa, r.b, r.sb},
                                  // C = D (never read: beta is 0), so that the host builds the C TMA
                                  // descriptor from a real address (a null one needs CUDA >= 12.6)
                                  {{}, const_cast<const Element**>(r.d), r.sd, r.d, r.sd},
                                  hw};
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.beta = 0.0f;
    return args;
  }

  static int64_t workspace_bytes(int groups, int device) {
    const Arrays r = carve(nullptr, groups);
    return r.bytes + align256(static_cast<int64_t>(Gemm::get_workspace_size(arguments(r, groups, device))));
  }
};

template <typename G>
__global__ void fill_arguments(typename G::Arrays r, Product product, int groups, const int32_t* offsets, int64_t rows,
                               int32_t n, int32_t k, const typename G::Gemm::ElementA* a,
                               const typename G::Gemm::ElementB* b, typename G::Gemm::ElementC* d) {
  const int g = blockIdx.x * blockDim.x + threadIdx.x;
  if (g >= groups) return;
  const GroupProblem p = group_problem(product, g, offsets, rows, n, k);
  r.shapes[g] = {p.m, p.n, p.k};
  r.a[g] = a + p.a_offset;
  r.b[g] = b + p.b_offset;
  r.d[g] = d + p.d_offset;
  r.sa[g] = cutlass::make_cute_packed_stride(typename G::StrideA{}, {p.m_extent, p.k, 1});
  r.sb[g] = cutlass::make_cute_packed_stride(typename G::StrideB{}, {p.n, p.k, 1});
  r.sd[g] = cutlass::make_cute_packed_stride(typename G::StrideD{}, {p.m_extent, p.n, 1});
}

template <typename G>
void run(Product product, int groups, const int32_t* offsets, int64_t rows, int32_t n, int32_t k, const void* a,
         const void* b, void* d, char* workspace, int device, cudaStream_t stream) {
  using Element = typename G::Gemm::ElementA;
  const typename G::Arrays r = G::carve(workspace, groups);
  fill_arguments<G><<<(groups + 127) / 128, 128, 0, stream>>>(
      r, product, groups, offsets, rows, n, k, static_cast<const Element*>(a), static_cast<const Element*>(b),
      static_cast<Element*>(d));
  cuda::check(cudaGetLastError(), "grouped GEMM argument kernel");
  typename G::Gemm gemm;
  const auto args = G::arguments(r, groups, device);
  auto status = gemm.can_implement(args);
  if (status == cutlass::Status::kSuccess) status = gemm.initialize(args, workspace + r.bytes, stream);
  if (status == cutlass::Status::kSuccess) status = gemm.run(stream);
  if (status != cutlass::Status::kSuccess) {
    throw std::runtime_error(std::string("CUTLASS grouped GEMM failed: ") + cutlassGetStatusString(status));
  }
}

// Entry points of one translation unit: (product, element) with both tile configurations.
template <typename Element, Product P>
struct Family {
  static int64_t workspace_bytes(int groups, int device) {
    return std::max(GroupedGemm<Element, P, LargeTile>::workspace_bytes(groups, device),
                    GroupedGemm<Element, P, SmallTile>::workspace_bytes(groups, device));
  }
  static void run(bool small, int groups, const int32_t* offsets, int64_t rows, int32_t n, int32_t k, const void* a,
                  const void* b, void* d, char* workspace, int device, cudaStream_t stream) {
    if (small) {
      sm90::run<GroupedGemm<Element, P, SmallTile>>(P, groups, offsets, rows, n, k, a, b, d, workspace, device,
                                                    stream);
    } else {
      sm90::run<GroupedGemm<Element, P, LargeTile>>(P, groups, offsets, rows, n, k, a, b, d, workspace, device,
                                                    stream);
    }
  }
};

}  // namespace moepp::gemm::sm90
