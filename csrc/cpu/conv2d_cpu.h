// What the CPU kernel of pyowt::conv2d_bias_act runs for given arguments.
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace pyowt {

// "winograd" (conv2d_winograd.cpp), "onednn" (oneDNN's fused convolution, through
// mkldnn::_convolution_pointwise) or "aten" (at::conv2d + relu_): the forward the CPU
// backend picks for x and weight. For tests and benchmark notes; raises on arguments the
// op itself would refuse.
std::string cpu_conv2d_algorithm(const at::Tensor& x, const at::Tensor& weight,
                                 at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation, int64_t groups);

}  // namespace pyowt
