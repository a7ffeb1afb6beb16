// The pybind11 module moepp_kernels._C. std::invalid_argument thrown by the
// checks reaches Python as ValueError; std::runtime_error as RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "build_config.h"
#include "cuda/arch_support.h"
#include "cuda/shared_memory.h"
#include "gemm/grouped_gemm.h"
#include "host_memory.h"
#include "moe/combine.h"
#include "moe/expert_gemms_cpu.h"
#include "moe/ffn_pointwise.h"
#include "moe/plan.h"
#include "router/router.h"
#include "router/router_launch.h"
#include "tensor_view.h"

namespace py = pybind11;
using moepp::DeviceType;
using moepp::DType;
using moepp::TensorView;

namespace {

TensorView make_view(uintptr_t data, const std::vector<int64_t>& shape, const std::vector<int64_t>& strides, int dtype,
                     int device, int device_index) {
  if (shape.size() != strides.size() || shape.size() > static_cast<size_t>(moepp::kMaxDims)) {
    throw std::invalid_argument("TensorView: shape and strides must have the same length (at most 4)");
  }
  if (dtype < 0 || dtype > static_cast<int>(DType::kUInt8)) throw std::invalid_argument("TensorView: unknown dtype code");
  if (device != static_cast<int>(DeviceType::kCPU) && device != static_cast<int>(DeviceType::kCUDA)) {
    throw std::invalid_argument("TensorView: unknown device code");
  }
  TensorView v;
  v.data = reinterpret_cast<void*>(data);
  v.ndim = static_cast<int32_t>(shape.size());
  for (size_t d = 0; d < shape.size(); ++d) {
    v.shape[d] = shape[d];
    v.strides[d] = strides[d];
  }
  v.dtype = static_cast<DType>(dtype);
  v.device = static_cast<DeviceType>(device);
  v.device_index = device_index;
  return v;
}

bool built_with_cuda() {
#ifdef MOEPP_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "moepp_kernels C++/CUDA kernels (torch-free; tensors cross as TensorView)";
  m.def("built_with_cuda", &built_with_cuda);
  m.def("advise_huge_pages", &moepp::advise_huge_pages, py::arg("data"), py::arg("bytes"),
        "madvise(MADV_HUGEPAGE) over the whole 2 MiB pages of a host range; the bytes advised");
  // Host blocks expose the buffer protocol: torch.frombuffer wraps one and keeps it alive as
  // long as the tensor's storage lives; then it goes back to the cache (csrc/host_memory.h).
  py::class_<moepp::HostBlock>(m, "HostBlock", py::buffer_protocol())
      .def_buffer([](moepp::HostBlock& b) {
        return py::buffer_info(b.data(), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(b.bytes())}, {py::ssize_t(1)});
      });
  m.def("host_block", &moepp::acquire_host_block, py::arg("bytes"),
        "an uninitialised host block of at least `bytes`, from the cache where one fits");
  m.def("set_host_cache_limit", &moepp::set_host_cache_limit, py::arg("bytes"));
  m.def("host_cache_limit", &moepp::host_cache_limit);
  m.def("host_cache_bytes", &moepp::host_cache_bytes);
  m.def("empty_host_cache", &moepp::empty_host_cache);
  // What the build compiled and where it runs (csrc/cuda/arch_support.h).
  m.def("cuda_archs", [] { return moepp::cuda::split_archs(MOEPP_CUDA_ARCH_LIST); });
  m.def(
      "cuda_arch_support",
      [](int major, int minor, const std::vector<std::string>& archs) {
        static const char* names[] = {"none", "ptx", "native"};
        return std::string(names[static_cast<int>(moepp::cuda::arch_support(major, minor, archs))]);
      },
      py::arg("major"), py::arg("minor"), py::arg("archs"));
  m.def("cutlass_family_for", &moepp::cuda::cutlass_family_for, py::arg("major"), py::arg("minor"),
        py::arg("families"));
  m.def("unsupported_device_message", &moepp::cuda::unsupported_device_message, py::arg("name"), py::arg("device"),
        py::arg("major"), py::arg("minor"), py::arg("archs"));

  py::class_<TensorView>(m, "TensorView")
      .def(py::init(&make_view), py::arg("data"), py::arg("shape"), py::arg("strides"), py::arg("dtype"),
           py::arg("device"), py::arg("device_index"))
      .def_property_readonly("ndim", [](const TensorView& v) { return v.ndim; })
      .def_property_readonly("shape", [](const TensorView& v) { return std::vector<int64_t>(v.shape, v.shape + v.ndim); });

  namespace rt = moepp::router;
  py::class_<rt::RouterOptions>(m, "RouterOptions")
      .def(py::init<>())
      .def_readwrite("num_experts", &rt::RouterOptions::num_experts)
      .def_readwrite("top_k", &rt::RouterOptions::top_k)
      .def_readwrite("copy_begin", &rt::RouterOptions::copy_begin)
      .def_readwrite("copy_end", &rt::RouterOptions::copy_end)
      .def_readwrite("zero_begin", &rt::RouterOptions::zero_begin)
      .def_property(
          "gating", [](const rt::RouterOptions& o) { return static_cast<int>(o.gating); },
          [](rt::RouterOptions& o, int g) { o.gating = static_cast<rt::Gating>(g); })
      .def_readwrite("normalize", &rt::RouterOptions::normalize)
      .def_readwrite("sigma", &rt::RouterOptions::sigma)
      .def_readwrite("renormalize", &rt::RouterOptions::renormalize)
      .def_readwrite("scaling", &rt::RouterOptions::scaling)
      .def_readwrite("scale_identity", &rt::RouterOptions::scale_identity);

  m.attr("ROUTER_MAX_TOP_K") = rt::kMaxTopK;
  m.attr("ROUTER_MAX_EXPERTS") = rt::kMaxExperts;
  m.def("router_validate_options", &rt::validate_options);
  m.def("router_partial_rows", [](int64_t tokens, int num_experts, int device) {
    return rt::partial_rows(tokens, num_experts, static_cast<DeviceType>(device));
  });
  // cpu_lanes: 0 for the ops; > 0 (tests, CPU tensors) runs the CUDA kernels' lane-team execution.
  m.def(
      "router_forward",
      [](const rt::RouterOptions& options, const TensorView& logits, const std::optional<TensorView>& prev,
         const std::optional<TensorView>& residual_weight, const std::optional<TensorView>& bias, const TensorView& ids,
         const TensorView& weights, const std::optional<TensorView>& logits_out, const TensorView& counts,
         const std::optional<TensorView>& prob_partials, int num_threads, uintptr_t stream, int cpu_lanes) {
        rt::forward(options, logits, prev, residual_weight, bias, ids, weights, logits_out, counts, prob_partials,
                    num_threads, stream, cpu_lanes);
      },
      py::arg("options"), py::arg("logits"), py::arg("prev_logits"), py::arg("residual_weight"),
      py::arg("selection_bias"), py::arg("ids"), py::arg("weights"), py::arg("logits_out"), py::arg("counts"),
      py::arg("prob_partials"), py::arg("num_threads"), py::arg("stream"), py::arg("cpu_lanes") = 0,
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "router_backward",
      [](const rt::RouterOptions& options, const TensorView& routed, const TensorView& ids,
         const std::optional<TensorView>& grad_weights, const std::optional<TensorView>& grad_logits_out,
         const std::optional<TensorView>& grad_prob_sum, const std::optional<TensorView>& residual_weight,
         const TensorView& grad_logits, const std::optional<TensorView>& grad_prev, int num_threads, uintptr_t stream,
         int cpu_lanes) {
        rt::backward(options, routed, ids, grad_weights, grad_logits_out, grad_prob_sum, residual_weight, grad_logits,
                     grad_prev, num_threads, stream, cpu_lanes);
      },
      py::arg("options"), py::arg("routed_logits"), py::arg("ids"), py::arg("grad_weights"),
      py::arg("grad_logits_out"), py::arg("grad_prob_sum"), py::arg("residual_weight"), py::arg("grad_logits"),
      py::arg("grad_prev"), py::arg("num_threads"), py::arg("stream"), py::arg("cpu_lanes") = 0,
      py::call_guard<py::gil_scoped_release>());
  // The launchers' shared-memory arithmetic, for the CPU tests (csrc/cuda/shared_memory.h,
  // router_launch.h, plan.h).
  m.def(
      "plan_dynamic_shared",
      [](size_t bytes, size_t static_bytes, size_t optin, size_t current) {
        const moepp::cuda::DynamicSharedPlan p = moepp::cuda::plan_dynamic_shared(bytes, static_bytes, optin, current);
        return py::make_tuple(p.budget, p.fits, p.attribute);
      },
      py::arg("bytes"), py::arg("static_bytes"), py::arg("optin"), py::arg("current"));
  m.def(
      "router_shared_layout",
      [](bool forward, size_t elem_bytes, int n, bool stats, bool has_g, size_t budget) {
        const rt::SharedLayout l = rt::shared_layout(forward, elem_bytes, n, stats, has_g, budget);
        return py::make_tuple(l.bytes, l.staged);
      },
      py::arg("forward"), py::arg("elem_bytes"), py::arg("num_experts"), py::arg("stats"), py::arg("has_g"),
      py::arg("budget"));
  m.def("router_lanes_for", &rt::lanes_for, py::arg("num_experts"));

  namespace moe = moepp::moe;
  m.attr("MAX_TOP_K_COMBINE") = moe::kMaxSlots;
  m.attr("MAX_PLAN_EXPERTS") = moe::kMaxPlanExperts;
  m.def("plan_workspace_ints", &moe::plan_workspace_ints);
  m.def(
      "plan_shared_bytes",
      [](int n_ffn) {
        const moe::PlanSharedBytes b = moe::plan_shared_bytes(n_ffn);
        return py::make_tuple(b.count, b.scatter);
      },
      py::arg("n_ffn"));
  m.def(
      "build_plan",
      [](const TensorView& ids, int n_ffn, const TensorView& offsets, const TensorView& row_src,
         const TensorView& slot_row, std::optional<TensorView> workspace, uintptr_t stream) {
        moe::build_plan(ids, n_ffn, offsets, row_src, slot_row, workspace ? &*workspace : nullptr, stream);
      },
      py::arg("topk_ids"), py::arg("n_ffn"), py::arg("offsets"), py::arg("row_src"), py::arg("slot_row"),
      py::arg("workspace"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def("gather_rows", &moe::gather_rows, py::arg("x"), py::arg("row_src"), py::arg("offsets"), py::arg("top_k"),
        py::arg("scale"), py::arg("out"), py::arg("num_threads"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());
  m.def("swiglu_forward", &moe::swiglu_forward, py::arg("h"), py::arg("offsets"), py::arg("a"),
        py::arg("num_threads"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def("swiglu_backward", &moe::swiglu_backward, py::arg("h"), py::arg("da"), py::arg("offsets"), py::arg("dh"),
        py::arg("a"), py::arg("num_threads"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def("expert_gemms_cpu_supported", &moe::expert_gemms_cpu_supported);
  m.def("expert_gemms_cpu_bf16_pairs", &moe::expert_gemms_cpu_bf16_pairs);
  m.def("set_expert_gemms_cpu_bf16_pairs", &moe::set_expert_gemms_cpu_bf16_pairs, py::arg("enabled"));
  m.def("up_swiglu_cpu", &moe::up_swiglu_cpu, py::arg("x"), py::arg("row_src"), py::arg("offsets"), py::arg("up"),
        py::arg("top_k"), py::arg("scale"), py::arg("a"), py::arg("h"), py::arg("num_threads"),
        py::call_guard<py::gil_scoped_release>());
  m.def("down_cpu", &moe::down_cpu, py::arg("a"), py::arg("offsets"), py::arg("down"), py::arg("y"),
        py::arg("num_threads"), py::call_guard<py::gil_scoped_release>());
  m.def("swiglu_grad_cpu", &moe::swiglu_grad_cpu, py::arg("dy"), py::arg("offsets"), py::arg("down"), py::arg("h"),
        py::arg("dh"), py::arg("a"), py::arg("num_threads"), py::call_guard<py::gil_scoped_release>());
  m.def("up_grad_input_cpu", &moe::up_grad_input_cpu, py::arg("dh"), py::arg("offsets"), py::arg("up"),
        py::arg("dx"), py::arg("num_threads"), py::call_guard<py::gil_scoped_release>());
  m.def("weight_grad_cpu", &moe::weight_grad_cpu, py::arg("lhs"), py::arg("rhs"), py::arg("rhs_src"),
        py::arg("offsets"), py::arg("top_k"), py::arg("scale"), py::arg("out"), py::arg("num_threads"),
        py::call_guard<py::gil_scoped_release>());
  m.def("row_sum", &moe::row_sum, py::arg("src"), py::arg("slot_row"), py::arg("scale"), py::arg("out"),
        py::arg("num_threads"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());

  py::class_<moe::ExpertLayout>(m, "ExpertLayout")
      .def(py::init([](int n_ffn, int copy_begin, int zero_begin, int n_experts) {
             return moe::ExpertLayout{n_ffn, n_ffn, copy_begin, zero_begin, n_experts};
           }),
           py::arg("n_ffn"), py::arg("copy_begin"), py::arg("zero_begin"), py::arg("n_experts"));
  py::class_<moe::CombineViews>(m, "CombineViews")
      .def(py::init([](TensorView x, TensorView y, TensorView ids, TensorView weights, TensorView slot_row,
                       TensorView mix, TensorView const_value) {
             return moe::CombineViews{x, y, ids, weights, slot_row, mix, const_value};
           }),
           py::arg("x"), py::arg("y"), py::arg("topk_ids"), py::arg("topk_weights"), py::arg("slot_row"),
           py::arg("const_logits"), py::arg("const_value"));
  namespace gm = moepp::gemm;
  m.def("cutlass_archs", &gm::cutlass_archs);
  py::class_<gm::GroupProblem>(m, "GroupProblem")
      .def_readonly("m", &gm::GroupProblem::m)
      .def_readonly("n", &gm::GroupProblem::n)
      .def_readonly("k", &gm::GroupProblem::k)
      .def_readonly("m_extent", &gm::GroupProblem::m_extent)
      .def_readonly("a_offset", &gm::GroupProblem::a_offset)
      .def_readonly("b_offset", &gm::GroupProblem::b_offset)
      .def_readonly("d_offset", &gm::GroupProblem::d_offset);
  m.def(
      "group_problems",
      [](int product, const TensorView& offsets, int64_t buffer_rows, int32_t n, int32_t k) {
        return gm::group_problems(static_cast<gm::Product>(product), offsets, buffer_rows, n, k);
      },
      py::arg("product"), py::arg("offsets"), py::arg("buffer_rows"), py::arg("n"), py::arg("k"));
  m.def(
      "cutlass_workspace_bytes",
      [](int product, int dtype, int groups, int device) {
        return gm::workspace_bytes(static_cast<gm::Product>(product), static_cast<DType>(dtype), groups, device);
      },
      py::arg("product"), py::arg("dtype"), py::arg("groups"), py::arg("device"));
  m.def(
      "cutlass_grouped_gemm",
      [](int product, const TensorView& a, const TensorView& b, const TensorView& d, const TensorView& offsets,
         const TensorView& workspace, uintptr_t stream) {
        gm::grouped_gemm(static_cast<gm::Product>(product), a, b, d, offsets, workspace, stream);
      },
      py::arg("product"), py::arg("a"), py::arg("b"), py::arg("out"), py::arg("offsets"), py::arg("workspace"),
      py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def("combine_forward", &moe::combine_forward, py::arg("inputs"), py::arg("layout"), py::arg("scale"),
        py::arg("out"), py::arg("num_threads"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def("combine_backward", &moe::combine_backward, py::arg("inputs"), py::arg("layout"), py::arg("scale"),
        py::arg("grad_out"), py::arg("grad_y"), py::arg("grad_x"), py::arg("grad_weights"),
        py::arg("grad_const_logits"), py::arg("const_value_coef"), py::arg("num_threads"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());
}
