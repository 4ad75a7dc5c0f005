// Typed dispatcher calls of the fused ops' forward, shared by their C++ autograd (which
// calls them below the Autograd key) and the unboxed Python entries (direct_calls.cpp,
// which enter at the top). Inline functions: one cached handle per op for the whole library.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>

namespace pyowt {

inline at::Tensor call_linear_bias_act(const at::Tensor& x, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias,
                                       c10::string_view activation) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pyowt::linear_bias_act", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                               const std::optional<at::Tensor>&, c10::string_view)>();
  return op.call(x, weight, bias, activation);
}

inline at::Tensor call_conv2d_bias_act(const at::Tensor& x, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                       at::IntArrayRef padding, at::IntArrayRef dilation,
                                       int64_t groups, c10::string_view activation) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("pyowt::conv2d_bias_act", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t,
                            c10::string_view)>();
  return op.call(x, weight, bias, stride, padding, dilation, groups, activation);
}

}  // namespace pyowt
