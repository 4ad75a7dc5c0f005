// Schemas of pyowt::bias_relu (kernels: cpu/bias_relu.cpp, cuda/bias_relu.cu).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(pyowt, m) {
  // y = relu(x + bias broadcast along `dim`)
  m.def("bias_relu(Tensor x, Tensor bias, int dim) -> Tensor");
  // (grad_x, grad_bias) from the forward's output: grad_x = grad_out * (out > 0)
  m.def("bias_relu_backward(Tensor grad_out, Tensor out, int dim) -> (Tensor, Tensor)");
}
