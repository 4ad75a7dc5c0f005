// The pyowt operator library and the Python module pyowt._C.
//
// Layout of csrc/: each op's schemas live in csrc/<op>.cpp (a TORCH_LIBRARY_FRAGMENT),
// its kernels in cpu/<op>.cpp and cuda/<op>.cu (TORCH_LIBRARY_IMPL per device), their
// autograd in csrc/<op>_autograd.cpp, unboxed Python entries in direct_calls.cpp. Fake
// (meta) kernels are registered from Python (pyowt/ops), which keeps one place for the
// backend choice and lets torch.compile trace every op.
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/conv2d_cpu.h"
#include "cpu/conv2d_winograd.h"
#include "direct_calls.h"

#ifndef PYOWT_WITH_CUDA
#define PYOWT_WITH_CUDA 0
#endif

#ifndef PYOWT_SM90A
#define PYOWT_SM90A 0
#endif

#if PYOWT_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

// Owns the namespace; the schemas are added by the fragments of each op.
TORCH_LIBRARY(pyowt, m) {}

namespace {

pybind11::dict build_config() {
  pybind11::dict d;
  d["with_cuda"] = static_cast<bool>(PYOWT_WITH_CUDA);
  // Device code for sm_90a (TORCH_CUDA_ARCH_LIST has 9.0a): the conv's wgmma tiles.
  d["sm90a"] = static_cast<bool>(PYOWT_WITH_CUDA && PYOWT_SM90A);
#if PYOWT_WITH_CUDA
  d["cudart_version"] = CUDART_VERSION;
#else
  d["cudart_version"] = pybind11::none();
#endif
#if defined(__clang__)
  d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  d["compiler"] = std::string("gcc ") + __VERSION__;
#else
  d["compiler"] = std::string("unknown");
#endif
  d["torch_api_version"] = std::to_string(TORCH_VERSION_MAJOR) + "." +
                           std::to_string(TORCH_VERSION_MINOR) + "." +
                           std::to_string(TORCH_VERSION_PATCH);
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pyowt compiled extension: registers the pyowt:: operators on import";
  m.def("build_config", &build_config, "What this extension was compiled with");
  pyowt::register_direct_calls(m);
  m.def("cpu_conv2d_algorithm", &pyowt::cpu_conv2d_algorithm, pybind11::arg("x"),
        pybind11::arg("weight"), pybind11::arg("stride"), pybind11::arg("padding"),
        pybind11::arg("dilation"), pybind11::arg("groups"),
        "The forward the cpu backend of conv2d_bias_act runs for these arguments: "
        "'winograd', 'onednn' or 'aten'");
  m.def("set_cpu_winograd_enabled", &pyowt::set_cpu_winograd_enabled, pybind11::arg("enabled"),
        "Turns the cpu backend's Winograd kernels (3x3 / 5x5 forward and gradients, AVX-512 "
        "CPUs) on or off; returns the previous setting");
  m.def("winograd_conv2d_weight_grad",
        [](const at::Tensor& x, const at::Tensor& grad_out, int64_t r, std::vector<int64_t> padding) {
          TORCH_CHECK(padding.size() == 2, "padding must have 2 elements, got ", padding.size());
          return pyowt::winograd_conv2d_weight_grad(x, grad_out, r, padding);
        },
        pybind11::arg("x"), pybind11::arg("grad_out"), pybind11::arg("r"), pybind11::arg("padding"),
        "Internal (tests): the cpu backend's Winograd weight gradient of a stride-1 r x r "
        "convolution, (C_out, C_in, r, r)");
  m.def("cpu_winograd_enabled", &pyowt::cpu_winograd_enabled,
        "Whether the cpu backend may run its Winograd kernels here (AVX-512F and switched on)");
}
