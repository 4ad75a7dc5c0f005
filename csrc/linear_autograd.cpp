// Autograd of pyowt::linear_bias_act, in C++ for every device the C++ kernels serve.
//
// Why not torch.library.register_autograd in Python: these ops sit on the per-layer hot
// path, and at AlexNet's FC sizes a GPU forward+backward is host-bound (benchmarks/
// RESULTS.md, H200). The Python wrapper (argument defaults, a Python autograd.Function,
// a redispatch) cost more per call than the whole of ATen's F.linear + relu; a C++
// autograd::Function costs a fraction of that, and opcheck / torch.compile see an
// ordinary Autograd kernel.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "autograd_skip.h"
#include "op_calls.h"

namespace pyowt {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& out,
    c10::string_view activation, bool has_bias) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("pyowt::linear_bias_act_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              c10::string_view, bool)>();
  return op.call(grad_out, x, weight, out, activation, has_bias);
}

class LinearBiasAct : public torch::autograd::Function<LinearBiasAct> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, c10::string_view activation) {
    at::Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      out = call_linear_bias_act(x, weight, bias, activation);
    }
    const bool relu = activation == "relu";
    // The output is kept only for the ReLU mask.
    ctx->save_for_backward({x, weight, relu ? out : at::Tensor()});
    // One packed entry (relu, has_bias): each saved_data insert hashes a string key and
    // allocates (host time per call).
    ctx->saved_data["flags"] = int64_t(relu) | (int64_t(bias.has_value() && bias->defined()) << 1);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const int64_t flags = ctx->saved_data["flags"].toInt();
    const char* activation = (flags & 1) ? "relu" : "none";
    const bool has_bias = (flags & 2) != 0;
    const at::Tensor& grad = grads[0];
    if (at::GradMode::is_enabled()) {
      // create_graph: the same gradients from differentiable ATen ops, so that gradients
      // of gradients are exact (the fused backward op has no derivative of its own; through
      // it autograd would silently drop terms).
      const at::Tensor& x = saved[0];
      const at::Tensor& weight = saved[1];
      const int64_t n = weight.size(0), k = weight.size(1);
      const at::Tensor g = (flags & 1) ? at::threshold_backward(grad, saved[2], 0) : grad;
      const at::Tensor g2 = g.reshape({-1, n});
      return {ctx->needs_input_grad(0) ? g.matmul(weight) : at::Tensor(),
              ctx->needs_input_grad(1) ? g2.t().mm(x.reshape({-1, k})) : at::Tensor(),
              has_bias && ctx->needs_input_grad(2) ? g2.sum(0) : at::Tensor(), at::Tensor()};
    }
    // With "none" the kernels never read `out`.
    const at::Tensor out = saved[2].defined() ? saved[2] : at::empty({0}, grad.options());
    auto [grad_x, grad_w, grad_b] = call_backward(grad, saved[0], saved[1], out, activation, has_bias);
    return {grad_x, grad_w, has_bias ? grad_b : at::Tensor(), at::Tensor()};
  }
};

at::Tensor linear_bias_act_autograd(const at::Tensor& x, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias,
                                    c10::string_view activation) {
  if ((activation == "relu" || activation == "none") && any_forward_grad(x, weight, bias)) {
    const at::Tensor y = at::linear(x, weight, bias);
    return activation == "relu" ? at::relu(y) : y;
  }
  if (!any_requires_grad(x, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_linear_bias_act(x, weight, bias, activation);
  }
  return LinearBiasAct::apply(x, weight, bias, activation);
}

}  // namespace
}  // namespace pyowt

TORCH_LIBRARY_IMPL(pyowt, Autograd, m) {
  m.impl("linear_bias_act", &pyowt::linear_bias_act_autograd);
}
