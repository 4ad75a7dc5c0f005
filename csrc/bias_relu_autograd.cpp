// Autograd of pyowt::bias_relu, in C++ for every device the C++ kernels serve (the reason
// it is not Python: csrc/linear_autograd.cpp).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>

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
    auto [grad_x, grad_bias] = op.call(grads[0], saved[0], ctx->saved_data["dim"].toInt());
    return {grad_x, grad_bias, at::Tensor()};
  }
};

at::Tensor bias_relu_autograd(const at::Tensor& x, const at::Tensor& bias, int64_t dim) {
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
