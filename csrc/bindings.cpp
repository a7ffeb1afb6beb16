// The pybind11 module moepp_kernels._C. std::invalid_argument thrown by the
// checks reaches Python as ValueError; std::runtime_error as RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <vector>

#include "router/router.h"
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
  if (dtype < 0 || dtype > static_cast<int>(DType::kInt64)) throw std::invalid_argument("TensorView: unknown dtype code");
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
  m.def("router_forward", &rt::forward, py::arg("options"), py::arg("logits"), py::arg("prev_logits"),
        py::arg("residual_weight"), py::arg("selection_bias"), py::arg("ids"), py::arg("weights"),
        py::arg("logits_out"), py::arg("counts"), py::arg("prob_partials"), py::arg("num_threads"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def("router_backward", &rt::backward, py::arg("options"), py::arg("routed_logits"), py::arg("ids"),
        py::arg("grad_weights"), py::arg("grad_logits_out"), py::arg("grad_prob_sum"), py::arg("residual_weight"),
        py::arg("grad_logits"), py::arg("grad_prev"), py::arg("num_threads"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());
}
