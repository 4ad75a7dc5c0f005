// CUDA kernels of pyowt::bias_relu and its backward.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "channel_layout.h"

namespace pyowt {
namespace {

constexpr int kThreads = 256;

int64_t grid_for(int64_t n) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, sms * 32));
}

template <typename scalar_t>
__global__ void bias_relu_fwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ bias,
                                     scalar_t* __restrict__ y, int64_t n, int64_t channels, int64_t inner) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += stride) {
    const int64_t c = (i / inner) % channels;
    const opmath_t v = static_cast<opmath_t>(x[i]) + static_cast<opmath_t>(bias[c]);
    y[i] = static_cast<scalar_t>(v > opmath_t(0) ? v : opmath_t(0));
  }
}

template <typename scalar_t>
__global__ void relu_mask_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ out,
                                 scalar_t* __restrict__ grad_x, int64_t n) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += stride) {
    grad_x[i] = out[i] > scalar_t(0) ? grad[i] : scalar_t(0);
  }
}

at::Tensor bias_relu_cuda(const at::Tensor& x_in, const at::Tensor& bias_in, int64_t dim) {
  dim = normalize_dim(dim, x_in.dim(), "x");
  check_bias_relu_args(x_in, bias_in, dim);
  TORCH_CHECK(x_in.is_cuda(), "bias_relu (cuda) got x on ", x_in.device());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto fmt = preferred_format(x_in, dim);
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor bias = bias_in.contiguous();
  at::Tensor out = at::empty_like(x, x.options().memory_format(fmt));
  const ChannelLayout l = channel_layout(x, dim, fmt);
  const int64_t n = x.numel();
  if (n == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bias_relu_cuda", [&] {
    bias_relu_fwd_kernel<scalar_t><<<grid_for(n), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), bias.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
        n, l.channels, l.inner);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> bias_relu_backward_cuda(const at::Tensor& grad_in,
                                                           const at::Tensor& out_in, int64_t dim) {
  dim = normalize_dim(dim, out_in.dim(), "out");
  check_bias_relu_backward_args(grad_in, out_in);
  TORCH_CHECK(out_in.is_cuda(), "bias_relu_backward (cuda) got out on ", out_in.device());
  const c10::cuda::CUDAGuard guard(out_in.device());
  const auto fmt = preferred_format(out_in, dim);
  const at::Tensor out = out_in.contiguous(fmt);
  const at::Tensor grad = grad_in.contiguous(fmt);
  at::Tensor grad_x = at::empty_like(out, out.options().memory_format(fmt));
  const ChannelLayout l = channel_layout(out, dim, fmt);
  const int64_t n = out.numel();
  if (n == 0) return {grad_x, at::zeros({l.channels}, out.options())};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "bias_relu_backward_cuda", [&] {
    relu_mask_kernel<scalar_t><<<grid_for(n), kThreads, 0, stream>>>(
        grad.const_data_ptr<scalar_t>(), out.const_data_ptr<scalar_t>(), grad_x.mutable_data_ptr<scalar_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // The per-channel sum goes through ATen's tuned reduction, accumulating in float.
  at::Tensor flat = grad_x.as_strided({l.outer, l.channels, l.inner}, {l.channels * l.inner, l.inner, 1});
  at::Tensor grad_bias = flat.sum(at::IntArrayRef{0, 2}, /*keepdim=*/false, at::kFloat).to(out.scalar_type());
  return {grad_x, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyowt, CUDA, m) {
  m.impl("bias_relu", &bias_relu_cuda);
  m.impl("bias_relu_backward", &bias_relu_backward_cuda);
}

}  // namespace pyowt
