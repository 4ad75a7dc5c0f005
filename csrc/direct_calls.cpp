// Direct Python entry points to the fused ops' forward, for eager mode.
//
// `torch.ops.pyowt.<op>.default(...)` parses its arguments against the schema and boxes them
// (~1.5 us per call on the 2-core dev CPU); these pybind functions take typed arguments and
// call the same dispatcher entry unboxed (Autograd key first, so the C++ autograd applies),
// which costs what ATen's own bindings cost. pyowt/ops uses them only for plain tensors
// outside torch.compile (dynamo traces torch.ops) and without __torch_function__ overrides.
#include <ATen/ATen.h>
#include <torch/extension.h>

#include <optional>
#include <vector>

#include "direct_calls.h"
#include "op_calls.h"

namespace pyowt {
namespace {

at::Tensor linear_bias_act_direct(const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const std::string& activation) {
  return call_linear_bias_act(x, weight, bias, activation);
}

at::Tensor conv2d_bias_act_direct(const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const std::vector<int64_t>& stride,
                                  const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation,
                                  int64_t groups, const std::string& activation) {
  return call_conv2d_bias_act(x, weight, bias, stride, padding, dilation, groups, activation);
}

}  // namespace

void register_direct_calls(pybind11::module& m) {
  // The GIL is released as ATen's bindings release it (the kernels may run for long on CPU).
  m.def("linear_bias_act_direct", &linear_bias_act_direct,
        pybind11::call_guard<pybind11::gil_scoped_release>(),
        "pyowt::linear_bias_act(x, weight, bias, activation), called unboxed");
  m.def("conv2d_bias_act_direct", &conv2d_bias_act_direct,
        pybind11::call_guard<pybind11::gil_scoped_release>(),
        "pyowt::conv2d_bias_act(x, weight, bias, stride, padding, dilation, groups, activation), "
        "called unboxed");
}

}  // namespace pyowt
