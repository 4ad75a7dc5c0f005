// Autograd of pyowt::bias_relu, in C++ for every device the C++ kernels serve (the reason
// it is not Python: csrc/linear_autograd.cpp).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "autograd_skip.h"

namespace pyowt {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_forward(const at::Tensor& x, const at::Tensor& bias, int64_t dim) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pyowt::bias_relu", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t)>();
  return op.call(x, bias, dim);
}

class BiasRelu : public torch::autograd::Function<BiasRelu> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& bias,
                            int64_t dim) {
    at::Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      out = call_forward(x, bias, dim);
    }
    ctx->save_for_backward({out});  // the mask out > 0 is all the backward needs
    ctx->saved_data["dim"] = dim;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("pyowt::bias_relu_backward", "")
            .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t)>();
    const auto saved = ctx->get_saved_variables();
    const int64_t dim = ctx->saved_data["dim"].toInt();
    if (at::GradMode::is_enabled()) {
      // create_graph: the same gradients from differentiable ATen ops, so that gradients
      // of gradients are exact (the fused backward op has no derivative of its own).
      const at::Tensor g = at::threshold_backward(grads[0], saved[0], 0);
      const int64_t channel = at::maybe_wrap_dim(dim, g.dim());
      std::vector<int64_t> others;
      for (int64_t d = 0; d < g.dim(); ++d) {
        if (d != channel) others.push_back(d);
      }
      return {g, others.empty() ? g : g.sum(others), at::Tensor()};
    }
    auto [grad_x, grad_bias] = op.call(grads[0], saved[0], dim);
    return {grad_x, grad_bias, at::Tensor()};
  }
};

at::Tensor bias_relu_autograd(const at::Tensor& x, const at::Tensor& bias, int64_t dim) {
  if (any_forward_grad(x, bias, std::nullopt) && bias.dim() == 1) {
    std::vector<int64_t> shape(x.dim(), 1);
    shape[at::maybe_wrap_dim(dim, x.dim())] = bias.size(0);
    return at::relu(x + bias.view(shape));
  }
  if (!any_requires_grad(x, bias, std::nullopt)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_forward(x, bias, dim);
  }
  return BiasRelu::apply(x, bias, dim);
}

}  // namespace
}  // namespace pyowt

TORCH_LIBRARY_IMPL(pyowt, Autograd, m) {
  m.impl("bias_relu", &pyowt::bias_relu_autograd);
}
