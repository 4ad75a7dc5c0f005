// Schemas of pyowt::conv2d_bias_act (kernels: cpu/conv2d.cpp, cuda/conv2d.cu).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(pyowt, m) {
  // out = act(conv2d(x, weight) + bias), act in {"relu", "none"}; bias may be None.
  // x: (N, C_in, H, W), weight: (C_out, C_in / groups, R, S); the output keeps x's memory
  // format (NCHW or channels_last).
  m.def(
      "conv2d_bias_act(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, str activation) -> Tensor");
  // (grad_x, grad_weight, grad_bias). The ReLU mask is recomputed from the forward's output
  // (out > 0). output_mask (grad x, grad weight, grad bias), as in aten::convolution_backward,
  // says which gradients to compute: a network's first layer needs no grad_x, and computing
  // it would dominate that layer's backward. A gradient not asked for, and grad_bias without
  // has_bias, is an empty (0,) tensor rather than None: a custom op's Tensor outputs must be
  // tensors (fake kernels, opcheck), as in the Triton twin conv2d_bias_act_backward_triton.
  m.def(
      "conv2d_bias_act_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor out, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, str activation, "
      "bool has_bias, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}
