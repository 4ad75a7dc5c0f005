// CUDA backward of pyowt::conv2d_bias_act (schema: csrc/conv2d.cpp). Each gradient only
// when output_mask asks for it (else an empty (0,) tensor):
//   grad_pre = grad_out * (out > 0)   (relu; identity for "none"), our own kernel;
//   grad_x, grad_weight:
//     * fp32, groups = 1: our SIMT kernels (plain FMA, no TF32 whatever torch's flags say, as
//       the fp32 forward): grad_x is the forward kernel run as the data-gradient GEMM
//       (conv2d_simt.cuh with kDgrad), grad_weight the split-M kernel of
//       conv2d_simt_wgrad.cuh;
//     * fp16 / bf16, groups > 1, problems whose indices would not fit in 32 bits: a
//       documented fallback to cuDNN through at::convolution_backward (it follows torch's
//       TF32 flags for fp32 and may pick Winograd/FFT algorithms);
//   grad_bias = grad_pre summed over (N, H, W) in fp32 (an empty (0,) tensor without bias).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

#include "channel_layout.h"
#include "conv2d_common.cuh"
#include "conv2d_output_mask.h"
#include "conv2d_simt.cuh"
#include "conv2d_simt_wgrad.cuh"

namespace pyowt {
namespace conv2d_cuda {
namespace {

constexpr const char* kBwd = "conv2d_bias_act_backward";

// grad_pre[i] = out[i] > 0 ? grad[i] : 0 over dense tensors of one memory format.
template <typename scalar_t>
__global__ void relu_grad_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ out,
                                 scalar_t* __restrict__ grad_pre, int64_t n) {
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += step) {
    grad_pre[i] = out[i] > scalar_t(0) ? grad[i] : scalar_t(0);
  }
}

at::Tensor relu_grad(const at::Tensor& grad_out, const at::Tensor& out_in, at::MemoryFormat fmt) {
  const at::Tensor out = out_in.contiguous(fmt);
  const at::Tensor grad = grad_out.contiguous(fmt);
  at::Tensor grad_pre = at::empty_like(out, out.options().memory_format(fmt));
  const int64_t n = out.numel();
  if (n == 0) return grad_pre;
  constexpr int kThreads = 256;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, sms * 32));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "conv2d_relu_grad", [&] {
    relu_grad_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        grad.const_data_ptr<scalar_t>(), out.const_data_ptr<scalar_t>(),
        grad_pre.mutable_data_ptr<scalar_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_pre;
}

void check_like_output(const at::Tensor& t, const char* name, const Geometry& g, const at::Tensor& x) {
  TORCH_CHECK(t.defined(), kBwd, ": ", name, " must be a defined tensor");
  TORCH_CHECK(t.dim() == 4 && t.size(0) == g.N && t.size(1) == g.Cout && t.size(2) == g.Ho &&
                  t.size(3) == g.Wo,
              kBwd, ": ", name, " must have the forward output's shape [", g.N, ", ", g.Cout, ", ",
              g.Ho, ", ", g.Wo, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), kBwd, ": ", name, " dtype ", t.scalar_type(),
              " differs from x dtype ", x.scalar_type());
  TORCH_CHECK(t.device() == x.device(), kBwd, ": ", name, " is on ", t.device(), " but x is on ",
              x.device());
}

// The data-gradient GEMM's geometry (conv2d_common.cuh): grad_pre (N, C_out, H_out, W_out)
// is the gathered image, x (N, C_in, H, W) the result, the forward's stride, padding and
// dilation.
Geometry dgrad_geometry(const Geometry& g) {
  Geometry t = g;
  t.C = g.Cout;
  t.H = g.Ho;
  t.W = g.Wo;
  t.Cout = g.C;
  t.Ho = g.H;
  t.Wo = g.W;
  return t;
}

// True when both fp32 kernels run this problem: groups = 1 and every index they form fits
// in 32 bits (the forward's and the data-gradient GEMM's).
bool simt_backward_fits(const Geometry& g) {
  const Geometry t = dgrad_geometry(g);
  return g.groups == 1 && fits_int32(g, g.R * g.S * g.C, simt::kWgradBK, simt::kWgradBCo) &&
         fits_int32(t, t.R * t.S * t.C, simt::kBM, simt::kBN);
}

// grad_x (x's shape, format fmt) from the NHWC grad_pre, through conv2d_simt_kernel<kDgrad>.
at::Tensor dgrad_simt(const Geometry& g, const at::Tensor& grad_pre_nhwc, const at::Tensor& weight,
                      at::MemoryFormat fmt, cudaStream_t stream) {
  const Geometry t = dgrad_geometry(g);
  const int64_t K = t.R * t.S * t.C;  // (r, s, co)
  const ConvParams p = make_params(t, K, /*relu=*/false);
  // B[c, (r, s, co)] = weight[co, c, r, s]: the weight stored (C_in, R, S, C_out).
  const at::Tensor w_t = weight.permute({1, 2, 3, 0}).contiguous();
  at::Tensor grad_x = at::empty({g.N, g.C, g.H, g.W}, grad_pre_nhwc.options().memory_format(fmt));
  if (grad_x.numel() == 0) return grad_x;  // e.g. H = 0 with padding: no rows, no launch
  const dim3 grid((p.M + simt::kBM - 1) / simt::kBM, (p.Cout + simt::kBN - 1) / simt::kBN);
  const float* gp = grad_pre_nhwc.const_data_ptr<float>();
  if (fmt == at::MemoryFormat::ChannelsLast) {
    simt::conv2d_simt_kernel<true, true><<<grid, simt::kThreads, 0, stream>>>(
        p, gp, w_t.const_data_ptr<float>(), nullptr, grad_x.mutable_data_ptr<float>());
  } else {
    simt::conv2d_simt_kernel<false, true><<<grid, simt::kThreads, 0, stream>>>(
        p, gp, w_t.const_data_ptr<float>(), nullptr, grad_x.mutable_data_ptr<float>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad_x;
}

// How many M slices the weight-gradient kernel runs: enough blocks for about four per SM,
// at least 256 rows per slice, at most 64 slices, and a workspace whose indices fit in int.
int64_t wgrad_splits(int64_t M, int64_t tiles, int64_t result_elems, int64_t sms) {
  const int64_t wanted = (4 * sms + tiles - 1) / tiles;
  const int64_t by_rows = std::max<int64_t>(1, M / 256);
  const int64_t by_index = std::max<int64_t>(1, ((int64_t{1} << 30) - 1) / result_elems);
  return std::max<int64_t>(1, std::min({wanted, by_rows, by_index, int64_t{64}}));
}

// grad_weight (weight's shape, format fmt) from the NHWC x and grad_pre.
at::Tensor wgrad_simt(const Geometry& g, const at::Tensor& x_nhwc, const at::Tensor& grad_pre_nhwc,
                      at::MemoryFormat fmt, cudaStream_t stream) {
  const int64_t K = g.R * g.S * g.C;
  // (C_out, R, S, C_in) contiguous is the channels_last layout of (C_out, C_in, R, S).
  at::Tensor grad_w_rsc = at::empty({g.Cout, g.R, g.S, g.C}, x_nhwc.options());
  if (K == 0) return grad_w_rsc.permute({0, 3, 1, 2}).contiguous(fmt);  // C_in = 0: no columns
  const ConvParams p = make_params(g, K, /*relu=*/false);
  const int64_t tiles = ((K + simt::kWgradBK - 1) / simt::kWgradBK) *
                        ((g.Cout + simt::kWgradBCo - 1) / simt::kWgradBCo);
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t splits = wgrad_splits(p.M, tiles, g.Cout * K, sms);
  constexpr int64_t kRows = simt::kWgradRows;
  const int64_t m_per_split = ((p.M + splits - 1) / splits + kRows - 1) / kRows * kRows;
  splits = (p.M + m_per_split - 1) / m_per_split;
  at::Tensor partial = splits == 1 ? grad_w_rsc : at::empty({splits, g.Cout, K}, x_nhwc.options());
  const dim3 grid((K + simt::kWgradBK - 1) / simt::kWgradBK, (g.Cout + simt::kWgradBCo - 1) / simt::kWgradBCo,
                  static_cast<unsigned>(splits));
  simt::conv2d_wgrad_simt_kernel<<<grid, simt::kWgradThreads, 0, stream>>>(
      p, x_nhwc.const_data_ptr<float>(), grad_pre_nhwc.const_data_ptr<float>(),
      partial.mutable_data_ptr<float>(), static_cast<int>(m_per_split));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) {
    at::Tensor grad_w_rows = grad_w_rsc.view({g.Cout, K});
    at::sum_out(grad_w_rows, partial, at::IntArrayRef{0});
  }
  return grad_w_rsc.permute({0, 3, 1, 2}).contiguous(fmt);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_bias_act_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& out,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    c10::string_view activation, bool has_bias, const c10::List<bool>& output_mask) {
  const Geometry g = check_conv2d_args(x, weight, std::nullopt, stride, padding, dilation, groups,
                                       activation, kBwd);
  check_like_output(grad_out, "grad_out", g, x);
  check_like_output(out, "out", g, x);
  const auto [want_x, want_w, want_b_arg] = read_output_mask(output_mask, kBwd);
  const bool want_b = has_bias && want_b_arg;
  // Distinct (0,) tensors: outputs of a custom op may not alias each other.
  at::Tensor grad_x = want_x ? at::Tensor() : at::empty({0}, x.options());
  at::Tensor grad_w = want_w ? at::Tensor() : at::empty({0}, x.options());
  at::Tensor grad_b = want_b ? at::Tensor() : at::empty({0}, x.options());
  if (!want_x && !want_w && !want_b) return {grad_x, grad_w, grad_b};
  const c10::cuda::CUDAGuard guard(x.device());
  const at::MemoryFormat fmt = preferred_format(out, 1);

  const bool use_simt = x.scalar_type() == at::kFloat && simt_backward_fits(g);
  // Stage 1: the activation's gradient, NHWC for our kernels (they read it as (M, C_out)).
  const at::MemoryFormat pre_fmt = use_simt ? at::MemoryFormat::ChannelsLast : fmt;
  const at::Tensor grad_pre =
      is_relu(activation) ? relu_grad(grad_out, out, pre_fmt) : grad_out.contiguous(pre_fmt);
  // Stage 2: data and weight gradients, only those asked for: grad_x of a stride-4 first
  // layer costs several times the rest of its backward.
  if (want_x || want_w) {
    const at::MemoryFormat x_fmt = preferred_format(x, 1);
    const at::MemoryFormat w_fmt = preferred_format(weight, 1);
    if (grad_pre.numel() == 0) {
      if (want_x) grad_x = at::zeros(x.sizes(), x.options().memory_format(x_fmt));
      if (want_w) grad_w = at::zeros(weight.sizes(), weight.options().memory_format(w_fmt));
    } else if (use_simt) {
      cudaStream_t stream = at::cuda::getCurrentCUDAStream();
      if (want_x) grad_x = dgrad_simt(g, grad_pre, weight, x_fmt, stream);
      if (want_w) {
        grad_w = wgrad_simt(g, x.contiguous(at::MemoryFormat::ChannelsLast), grad_pre, w_fmt, stream);
      }
    } else {
      at::Tensor gx, gw, unused;
      std::tie(gx, gw, unused) = at::convolution_backward(
          grad_pre, x, weight, /*bias_sizes=*/std::nullopt, stride, padding, dilation,
          /*transposed=*/false, /*output_padding=*/{0, 0}, groups, {want_x, want_w, false});
      // Same layouts as the other backends (cuDNN may pick its own).
      if (want_x) grad_x = gx.contiguous(x_fmt);
      if (want_w) grad_w = gw.contiguous(w_fmt);
    }
  }
  // Stage 3: the bias gradient, accumulated in fp32.
  if (want_b) {
    grad_b = grad_pre.sum(at::IntArrayRef{0, 2, 3}, /*keepdim=*/false, at::kFloat).to(x.scalar_type());
  }
  return {grad_x, grad_w, grad_b};
}

}  // namespace
}  // namespace conv2d_cuda

TORCH_LIBRARY_IMPL(pyowt, CUDA, m) {
  m.impl("conv2d_bias_act_backward", &conv2d_cuda::conv2d_bias_act_backward_cuda);
}

}  // namespace pyowt
