// Autograd of pyowt::conv2d_bias_act, in C++ for every device the C++ kernels serve
// (the reason it is not Python: csrc/linear_autograd.cpp).
//
// The backward passes needs_input_grad as the backward op's output_mask: a network's first
// layer needs no input gradient, and computing it anyway cost 2-3x the whole backward of a
// stride-4 11x11 layer on CPU and 7x on an H200 (benchmarks/RESULTS.md).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "autograd_skip.h"
#include "op_calls.h"

namespace pyowt {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& out,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    c10::string_view activation, bool has_bias, const c10::List<bool>& output_mask) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("pyowt::conv2d_bias_act_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t, c10::string_view, bool,
              const c10::List<bool>&)>();
  return op.call(grad_out, x, weight, out, stride, padding, dilation, groups, activation, has_bias,
                 output_mask);
}

class Conv2dBiasAct : public torch::autograd::Function<Conv2dBiasAct> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                            c10::string_view activation) {
    at::Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      out = call_conv2d_bias_act(x, weight, bias, stride, padding, dilation, groups, activation);
    }
    const bool relu = activation == "relu";
    ctx->save_for_backward({x, weight, relu ? out : at::Tensor()});  // out: the ReLU mask only
    // One packed entry instead of six: each saved_data insert hashes a string key and
    // allocates (host time per call). Layout: stride, padding, dilation (2 each), groups,
    // relu, has_bias.
    const bool has_bias = bias.has_value() && bias->defined();
    ctx->saved_data["conv"] = std::vector<int64_t>{stride[0], stride[1], padding[0], padding[1],
                                                   dilation[0], dilation[1], groups, relu, has_bias};
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& weight = saved[1];
    const at::Tensor& out = saved[2];
    const std::vector<int64_t> conv = ctx->saved_data["conv"].toIntVector();
    const std::vector<int64_t> stride{conv[0], conv[1]}, padding{conv[2], conv[3]},
        dilation{conv[4], conv[5]};
    const int64_t groups = conv[6];
    const char* activation = conv[7] ? "relu" : "none";
    const bool has_bias = conv[8] != 0;
    const at::Tensor& grad = grads[0];
    const bool want_x = ctx->needs_input_grad(0);
    const bool want_w = ctx->needs_input_grad(1);
    const bool want_b = has_bias && ctx->needs_input_grad(2);
    if (at::GradMode::is_enabled()) {
      // create_graph: the same gradients from differentiable ATen ops (convolution_backward
      // has a derivative), so that gradients of gradients are exact; the fused backward op
      // has none of its own.
      const at::Tensor g = conv[7] ? at::threshold_backward(grad, out, 0) : grad;
      at::Tensor gx, gw, unused;
      if (want_x || want_w) {
        std::tie(gx, gw, unused) = at::convolution_backward(
            g, x, weight, std::nullopt, stride, padding, dilation, /*transposed=*/false,
            /*output_padding=*/{0, 0}, groups, {want_x, want_w, false});
      }
      return {want_x ? gx : at::Tensor(), want_w ? gw : at::Tensor(),
              want_b ? g.sum(at::IntArrayRef{0, 2, 3}) : at::Tensor(), at::Tensor(), at::Tensor(),
              at::Tensor(), at::Tensor(), at::Tensor()};
    }
    // With "none" the op reads `out` for its shape only: pass the gradient instead.
    auto [grad_x, grad_w, grad_b] =
        call_backward(grad, x, weight, out.defined() ? out : grad, stride, padding, dilation,
                      groups, activation, has_bias, c10::List<bool>({want_x, want_w, want_b}));
    // The op's (0,) placeholders for gradients not asked for become "no gradient".
    return {want_x ? grad_x : at::Tensor(), want_w ? grad_w : at::Tensor(),
            want_b ? grad_b : at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor conv2d_bias_act_autograd(const at::Tensor& x, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef dilation,
                                    int64_t groups, c10::string_view activation) {
  if ((activation == "relu" || activation == "none") && any_forward_grad(x, weight, bias)) {
    const at::Tensor y = at::conv2d(x, weight, bias, stride, padding, dilation, groups);
    return activation == "relu" ? at::relu(y) : y;
  }
  if (!any_requires_grad(x, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_conv2d_bias_act(x, weight, bias, stride, padding, dilation, groups, activation);
  }
  return Conv2dBiasAct::apply(x, weight, bias, stride, padding, dilation, groups, activation);
}

}  // namespace
}  // namespace pyowt

TORCH_LIBRARY_IMPL(pyowt, Autograd, m) {
  m.impl("conv2d_bias_act", &pyowt::conv2d_bias_act_autograd);
}
