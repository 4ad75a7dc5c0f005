// CPU kernels of pyowt::linear_bias_act and its backward.
//
// The GEMMs go to oneDNN or MKL through ATen; what this file adds is the fusion around them:
//  * forward: oneDNN's inner product with the bias and ReLU as post-ops
//    (mkldnn::_linear_pointwise, reached through the dispatcher so this file needs no
//    oneDNN headers) for float32 GEMMs big enough to amortize its set-up; otherwise
//    addmm + in-place ReLU. Measured on a 2-core x86 CPU (torch 2.14): oneDNN is 1.3-2x
//    faster than addmm for float32 at 128x2304x1024 and up and slower below ~32x256x256;
//    for bfloat16 the two are equal, and oneDNN rejects float16 on CPUs without
//    AVX512-FP16, so half types stay on addmm.
//  * backward: one pass applies the ReLU mask to grad_out and sums it per output feature
//    (the bias gradient), then dX = G W and dW = G^T X. dX goes through the same oneDNN
//    inner product (weight^T as its weight) where that measured faster; dW through at::mm.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "linear.h"

namespace pyowt {

namespace {

// Below this many multiply-adds oneDNN's primitive set-up costs more than it saves.
constexpr int64_t kOneDnnMinMacs = int64_t(1) << 22;

const std::optional<c10::OperatorHandle>& onednn_linear_op() {
  static const std::optional<c10::OperatorHandle> op =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  return op;
}

bool use_onednn(at::ScalarType dtype, int64_t m, int64_t n, int64_t k) {
  return dtype == at::kFloat && m > 0 && n > 0 && k > 0 && m * n * k >= kOneDnnMinMacs &&
         onednn_linear_op().has_value();
}

// y (m, n) = act(x (m, k) @ w (n, k)^T + bias) via oneDNN; `w` may be a strided view.
at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& w,
                         const std::optional<at::Tensor>& bias, bool relu) {
  torch::jit::Stack stack;
  stack.reserve(6);
  stack.emplace_back(x);
  stack.emplace_back(w);
  stack.emplace_back(bias.has_value() ? c10::IValue(*bias) : c10::IValue());
  stack.emplace_back(std::string(relu ? "relu" : "none"));
  stack.emplace_back(c10::List<std::optional<at::Scalar>>());
  stack.emplace_back(std::string(""));
  onednn_linear_op()->callBoxed(&stack);
  return stack[0].toTensor();
}

at::Tensor linear_bias_act_cpu(const at::Tensor& x_in, const at::Tensor& weight_in,
                               const std::optional<at::Tensor>& bias_in,
                               c10::string_view activation) {
  const bool relu = linear_is_relu(activation);
  check_linear_args(x_in, weight_in, bias_in);
  TORCH_CHECK(x_in.device().is_cpu(), "linear_bias_act (cpu) got x on ", x_in.device());
  const int64_t n = weight_in.size(0), k = weight_in.size(1);
  const at::Tensor x = as_matrix(x_in, k);
  const at::Tensor weight = weight_in.contiguous();
  std::optional<at::Tensor> bias;
  if (bias_in.has_value()) bias = bias_in->contiguous();
  const int64_t m = x.size(0);

  at::Tensor y;
  if (use_onednn(x.scalar_type(), m, n, k)) {
    y = onednn_linear(x, weight, bias, relu);
  } else {
    y = bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
    if (relu) y.relu_();
  }
  return unflatten_rows(y, x_in, n);
}

// G = grad * (out > 0) (or grad itself when out is undefined) and, if wanted, its sum over
// rows in opmath precision. Rows are split into a fixed number of chunks with their own
// partial sums, added in a fixed order: the result does not depend on the thread count
// schedule.
std::tuple<at::Tensor, at::Tensor> mask_and_colsum(const at::Tensor& grad, const at::Tensor& out,
                                                   bool want_sum) {
  const int64_t m = grad.size(0), n = grad.size(1);
  const bool relu = out.defined();
  at::Tensor g = relu ? at::empty_like(grad) : grad;
  // Every element is written below; only the no-rows case needs zeros (host time per call).
  at::Tensor colsum = at::empty({want_sum ? n : 0}, grad.options());
  if ((!relu && !want_sum) || m == 0 || n == 0) return {g, colsum.zero_()};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "linear_mask_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const scalar_t* yp = relu ? out.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dp = relu ? g.mutable_data_ptr<scalar_t>() : nullptr;
    const int64_t chunks = std::min<int64_t>(m, std::max<int64_t>(1, at::get_num_threads() * 4));
    std::vector<opmath_t> partial(want_sum ? static_cast<size_t>(chunks * n) : 0, opmath_t(0));
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t chunk = c0; chunk < c1; ++chunk) {
        const int64_t r0 = m * chunk / chunks, r1 = m * (chunk + 1) / chunks;
        opmath_t* acc = want_sum ? partial.data() + chunk * n : nullptr;
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t* gr = gp + r * n;
          if (relu) {
            const scalar_t* yr = yp + r * n;
            scalar_t* dr = dp + r * n;
            for (int64_t j = 0; j < n; ++j) dr[j] = yr[j] > scalar_t(0) ? gr[j] : scalar_t(0);
            gr = dr;
          }
          if (acc != nullptr) {
            for (int64_t j = 0; j < n; ++j) acc[j] += static_cast<opmath_t>(gr[j]);
          }
        }
      }
    });
    if (want_sum) {
      scalar_t* sp = colsum.mutable_data_ptr<scalar_t>();
      for (int64_t j = 0; j < n; ++j) {
        opmath_t s = 0;
        for (int64_t chunk = 0; chunk < chunks; ++chunk) s += partial[chunk * n + j];
        sp[j] = static_cast<scalar_t>(s);
      }
    }
  });
  return {g, colsum};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_bias_act_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& weight_in,
    const at::Tensor& out_in, c10::string_view activation, bool has_bias) {
  const bool relu = linear_is_relu(activation);
  check_linear_backward_args(grad_in, x_in, weight_in, out_in, relu);
  TORCH_CHECK(x_in.device().is_cpu(), "linear_bias_act_backward (cpu) got x on ", x_in.device());
  const int64_t n = weight_in.size(0), k = weight_in.size(1);
  const at::Tensor x = as_matrix(x_in, k);
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor grad = as_matrix(grad_in, n);
  const at::Tensor out = relu ? as_matrix(out_in, n) : at::Tensor();
  const int64_t m = x.size(0);

  auto [g, grad_bias] = mask_and_colsum(grad, out, has_bias);
  at::Tensor grad_x = use_onednn(x.scalar_type(), m, k, n)
                          ? onednn_linear(g, weight.t(), std::nullopt, /*relu=*/false)
                          : at::mm(g, weight);
  at::Tensor grad_w = at::mm(g.t(), x);
  return {unflatten_rows(grad_x, x_in, k), grad_w, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyowt, CPU, m) {
  m.impl("linear_bias_act", &linear_bias_act_cpu);
  m.impl("linear_bias_act_backward", &linear_bias_act_backward_cpu);
}

}  // namespace pyowt
