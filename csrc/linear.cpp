// Schemas of pyowt::linear_bias_act (kernels: cpu/linear.cpp, cuda/linear.cu) and the
// argument checks both kernels share (declared again at the top of each kernel file; kept
// here, in one translation unit, so the CPU and CUDA ops report mistakes identically).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "channel_layout.h"

#include "linear.h"

TORCH_LIBRARY_FRAGMENT(pyowt, m) {
  // y = act(x @ weight^T + bias); x (..., K), weight (N, K), bias (N,) or None,
  // activation "relu" or "none". y is contiguous, shape (..., N).
  m.def("linear_bias_act(Tensor x, Tensor weight, Tensor? bias, str activation) -> Tensor");
  // (grad_x, grad_weight, grad_bias) of the op above. `out` is the forward's output (only
  // read for "relu": the mask is out > 0); grad_bias has shape (0,) when has_bias is false.
  m.def(
      "linear_bias_act_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor out, "
      "str activation, bool has_bias) -> (Tensor, Tensor, Tensor)");
}

namespace pyowt {

int64_t linear_rows(const at::Tensor& x) {
  // The product of the leading dims (not numel / in_features: in_features may be 0).
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);
  return rows;
}

at::Tensor as_matrix(const at::Tensor& t, int64_t cols) {
  return t.dim() == 2 ? t.contiguous() : t.reshape({linear_rows(t), cols}).contiguous();
}

at::Tensor unflatten_rows(const at::Tensor& y, const at::Tensor& x, int64_t n) {
  return x.dim() == 2 ? y : y.reshape(linear_out_shape(x, n));
}

std::vector<int64_t> linear_out_shape(const at::Tensor& x, int64_t n) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(n);
  return shape;
}

bool linear_is_relu(c10::string_view activation) {
  TORCH_CHECK(activation == "relu" || activation == "none",
              "activation must be \"relu\" or \"none\", got \"", std::string(activation), "\"");
  return activation == "relu";
}

void check_linear_args(const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias) {
  check_float_dtype(x, "x");
  TORCH_CHECK(x.dim() >= 1, "x must have at least 1 dimension, got a 0-d tensor");
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-d (out_features, in_features), got shape ",
              weight.sizes());
  TORCH_CHECK(weight.size(1) == x.size(-1), "weight has in_features ", weight.size(1),
              " but x has ", x.size(-1), " features in its last dim (x shape ", x.sizes(), ")");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight dtype ", weight.scalar_type(),
              " differs from x dtype ", x.scalar_type());
  TORCH_CHECK(weight.device() == x.device(), "weight is on ", weight.device(), " but x is on ",
              x.device());
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == weight.size(0), "bias must have shape (",
                weight.size(0), ",) to match weight's out_features, got ", b.sizes());
    TORCH_CHECK(b.scalar_type() == x.scalar_type(), "bias dtype ", b.scalar_type(),
                " differs from x dtype ", x.scalar_type());
    TORCH_CHECK(b.device() == x.device(), "bias is on ", b.device(), " but x is on ", x.device());
  }
}

void check_linear_backward_args(const at::Tensor& grad_out, const at::Tensor& x,
                                const at::Tensor& weight, const at::Tensor& out, bool relu) {
  check_linear_args(x, weight, std::nullopt);
  std::vector<int64_t> expected(x.sizes().begin(), x.sizes().end() - 1);
  expected.push_back(weight.size(0));
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(expected), "grad_out shape ", grad_out.sizes(),
              " differs from the output shape ", at::IntArrayRef(expected));
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), "grad_out dtype ",
              grad_out.scalar_type(), " differs from x dtype ", x.scalar_type());
  TORCH_CHECK(grad_out.device() == x.device(), "grad_out is on ", grad_out.device(),
              " but x is on ", x.device());
  if (relu) {
    TORCH_CHECK(out.sizes() == grad_out.sizes(), "out shape ", out.sizes(),
                " differs from grad_out shape ", grad_out.sizes());
    TORCH_CHECK(out.scalar_type() == x.scalar_type(), "out dtype ", out.scalar_type(),
                " differs from x dtype ", x.scalar_type());
    TORCH_CHECK(out.device() == x.device(), "out is on ", out.device(), " but x is on ",
                x.device());
  }
}

}  // namespace pyowt
