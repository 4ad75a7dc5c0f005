// Winograd F(2x2, 3x3) and F(2x2, 5x5) forward for the CPU backend of pyowt::conv2d_bias_act.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace pyowt {

// Whether this process may run the Winograd kernel: the CPU has AVX-512F and neither
// PYOWT_CPU_CONV_WINOGRAD=0 nor set_cpu_winograd_enabled(false) turned it off.
bool cpu_winograd_enabled();

// Turns the Winograd path on or off for this process (it still needs AVX-512F); returns
// the previous setting. For A/B measurements and tests.
bool set_cpu_winograd_enabled(bool enabled);

// Whether winograd_conv2d accepts these arguments: float32 NCHW x (N, C_in, H, W),
// weight (C_out, C_in, 3, 3) or (C_out, C_in, 5, 5), stride 1, dilation 1, groups 1, and
// tensors small enough for 32-bit element offsets. Says nothing about whether it is
// faster (the caller's choice).
bool winograd_conv2d_accepts(const at::Tensor& x, const at::Tensor& weight,
                             at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation, int64_t groups);

// act(conv2d(x, weight, bias, stride=1, padding)) as a contiguous (N, C_out, H_out, W_out)
// float32 tensor, computed with Winograd F(2x2, r x r) for the weight's r in {3, 5}; bias
// and ReLU in the output transform. Requires winograd_conv2d_accepts(...) and
// cpu_winograd_enabled().
at::Tensor winograd_conv2d(const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, at::IntArrayRef padding,
                           bool relu);

// The weight gradient of conv2d(x, weight, stride=1, padding) for grad_out (N, C_out,
// H_out, W_out), contiguous float32 with any ReLU mask already applied, and an r x r
// weight (r = 3 or 5): (C_out, C_in, r, r), computed with Winograd F(r x r, 2 x 2)
// (conv2d_winograd_wgrad.cpp). Requires winograd_conv2d_accepts(...) for that weight.
at::Tensor winograd_conv2d_weight_grad(const at::Tensor& x, const at::Tensor& grad_out,
                                       int64_t r, at::IntArrayRef padding);

}  // namespace pyowt
