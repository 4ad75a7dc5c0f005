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
  // (out > 0); grad_bias has shape (C_out,) when has_bias, else it is an empty (0,) tensor.
  m.def(
      "conv2d_bias_act_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor out, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, str activation, "
      "bool has_bias) -> (Tensor, Tensor, Tensor)");
}
