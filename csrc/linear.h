// Shared helpers of the pyowt::linear_bias_act kernels (defined in csrc/linear.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace pyowt {

// Rows of x seen as (rows, in_features).
int64_t linear_rows(const at::Tensor& x);
// True for "relu", false for "none"; any other string is an error naming it.
bool linear_is_relu(c10::string_view activation);
void check_linear_args(const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias);
void check_linear_backward_args(const at::Tensor& grad_out, const at::Tensor& x,
                                const at::Tensor& weight, const at::Tensor& out, bool relu);

}  // namespace pyowt
