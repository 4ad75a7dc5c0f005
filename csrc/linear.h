// Shared helpers of the pyowt::linear_bias_act kernels (defined in csrc/linear.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace pyowt {

// Rows of x seen as (rows, in_features).
int64_t linear_rows(const at::Tensor& x);
// x's shape with the last dim replaced by n (the output's shape).
std::vector<int64_t> linear_out_shape(const at::Tensor& x, int64_t n);
// t as a contiguous (rows, cols) matrix; a 2-d t skips the reshape (host time per call).
at::Tensor as_matrix(const at::Tensor& t, int64_t cols);
// y (rows, n) in x's leading dims + (n,); returned as is when x is 2-d.
at::Tensor unflatten_rows(const at::Tensor& y, const at::Tensor& x, int64_t n);
// True for "relu", false for "none"; any other string is an error naming it.
bool linear_is_relu(c10::string_view activation);
void check_linear_args(const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias);
void check_linear_backward_args(const at::Tensor& grad_out, const at::Tensor& x,
                                const at::Tensor& weight, const at::Tensor& out, bool relu);

}  // namespace pyowt
