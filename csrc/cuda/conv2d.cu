// CUDA kernels of pyowt::conv2d_bias_act and its backward (schemas: csrc/conv2d.cpp).
//
// Forward: out = act(conv2d(x, weight) + bias), act in {relu, none}, as an implicit GEMM
// (M = N * H_out * W_out, N_gemm = C_out, K = C_in * R * S) over NHWC activations:
//   * fp16 / bf16: tensor cores through WMMA, fp32 accumulation (conv2d_tc.cuh), sm_80+;
//   * fp32: a register-blocked SIMT kernel without TF32 (conv2d_simt.cuh).
// The input is read channels_last (an NCHW input is copied once), the weight reordered to
// (C_out, R, S, C_in) so that k runs along contiguous channels; the output is written
// directly in x's memory format (preferred_format: channels_last only when x is
// channels_last and not plain contiguous).
// Fallback to ATen (at::convolution, i.e. cuDNN, + bias + relu) for what the kernels do not
// cover: groups > 1, fp16/bf16 on GPUs below sm_80, and problems whose indices would not
// fit in 32 bits. The fallback follows torch's cuDNN TF32 setting for fp32.
//
// Backward (a documented fallback that a fused kernel can replace piece by piece), each
// gradient only when output_mask asks for it (else an empty (0,) tensor):
//   grad_pre = grad_out * (out > 0)   (relu; identity for "none"), our own kernel;
//   grad_x, grad_weight = at::convolution_backward(grad_pre, ...)  (cuDNN; follows torch's
//                         TF32 flags in fp32);
//   grad_bias = grad_pre summed over (N, H, W) in fp32 (an empty (0,) tensor without bias).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "channel_layout.h"
#include "conv2d_common.cuh"
#include "conv2d_output_mask.h"
#include "conv2d_simt.cuh"
#include "conv2d_tc.cuh"

namespace pyowt {
namespace conv2d_cuda {
namespace {

constexpr const char* kFwd = "conv2d_bias_act";
constexpr const char* kBwd = "conv2d_bias_act_backward";

// act(at::convolution(...) + bias) in x's memory format.
at::Tensor conv2d_aten_fallback(const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                bool relu, at::MemoryFormat fmt) {
  at::Tensor out = at::convolution(x, weight, bias, stride, padding, dilation, /*transposed=*/false,
                                   /*output_padding=*/{0, 0}, groups);
  if (relu) out.relu_();
  return out.contiguous(fmt);
}

bool aligned16(const void* ptr) { return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0; }

// The weight as a (C_out, ldw) matrix with k = (r, s, c) contiguous and zero columns
// K..ldw-1, 16-byte aligned: one copy (none for an aligned channels_last weight, ldw == K).
at::Tensor reorder_weight(const at::Tensor& weight, int64_t ldw) {
  const int64_t cout = weight.size(0);
  const int64_t K = weight.size(1) * weight.size(2) * weight.size(3);
  const at::Tensor w_rsc = weight.permute({0, 2, 3, 1});  // (C_out, R, S, C_in) view
  if (ldw == K) {
    at::Tensor wk = w_rsc.contiguous().view({cout, K});
    // A channels_last view with a storage offset comes back uncopied: realign it.
    return aligned16(wk.const_data_ptr()) ? wk : wk.clone();
  }
  at::Tensor wk = at::zeros({cout, ldw}, weight.options());
  wk.narrow(1, 0, K).view({cout, weight.size(2), weight.size(3), weight.size(1)}).copy_(w_rsc);
  return wk;
}

template <typename scalar_t, bool kVecA>
void launch_tc(const ConvParams& p, const at::Tensor& xc, const at::Tensor& wk,
               const scalar_t* bias, at::Tensor& out, bool nhwc_out, cudaStream_t stream) {
  const dim3 grid((p.M + tc::kBM - 1) / tc::kBM, (p.Cout + tc::kBN - 1) / tc::kBN);
  const auto* x = reinterpret_cast<const uint16_t*>(xc.const_data_ptr<scalar_t>());
  const auto* w = reinterpret_cast<const uint16_t*>(wk.const_data_ptr<scalar_t>());
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  if (nhwc_out) {
    tc::conv2d_tc_kernel<scalar_t, kVecA, true><<<grid, tc::kThreads, 0, stream>>>(p, x, w, bias, o);
  } else {
    tc::conv2d_tc_kernel<scalar_t, kVecA, false><<<grid, tc::kThreads, 0, stream>>>(p, x, w, bias, o);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor conv2d_bias_act_cuda(const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias_opt, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                c10::string_view activation) {
  const Geometry g =
      check_conv2d_args(x, weight, bias_opt, stride, padding, dilation, groups, activation, kFwd);
  const c10::cuda::CUDAGuard guard(x.device());
  const bool relu = is_relu(activation);
  const at::MemoryFormat fmt = preferred_format(x, 1);
  const bool has_bias = bias_opt.has_value() && bias_opt->defined();
  const bool half_like = x.scalar_type() != at::kFloat;

  // Tensor-core path: weight rows padded to a multiple of 8 halves (16 bytes) so that every
  // B chunk is one aligned cp.async; SIMT path: no padding.
  const int64_t K = g.R * g.S * g.C;
  const int64_t ldw = half_like ? (K + 7) / 8 * 8 : K;
  const int64_t tile_m = half_like ? tc::kBM : simt::kBM;
  const int64_t tile_n = half_like ? tc::kBN : simt::kBN;
  const bool tc_capable = !half_like || at::cuda::getCurrentDeviceProperties()->major >= 8;
  if (groups != 1 || !tc_capable || !fits_int32(g, ldw, tile_m, tile_n)) {
    // groups > 1 (and the cases above) run on ATen/cuDNN; see the file comment.
    return conv2d_aten_fallback(x, weight, bias_opt, stride, padding, dilation, groups, relu, fmt);
  }

  at::Tensor out = at::empty({g.N, g.Cout, g.Ho, g.Wo}, x.options().memory_format(fmt));
  if (out.numel() == 0) return out;
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor wk = reorder_weight(weight, ldw);
  const at::Tensor bias = has_bias ? bias_opt->contiguous() : at::Tensor();
  const ConvParams p = make_params(g, ldw, relu);
  const bool nhwc_out = fmt == at::MemoryFormat::ChannelsLast;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  if (!half_like) {
    const dim3 grid((p.M + simt::kBM - 1) / simt::kBM, (p.Cout + simt::kBN - 1) / simt::kBN);
    const float* b = has_bias ? bias.const_data_ptr<float>() : nullptr;
    if (nhwc_out) {
      simt::conv2d_simt_kernel<true><<<grid, simt::kThreads, 0, stream>>>(
          p, xc.const_data_ptr<float>(), wk.const_data_ptr<float>(), b, out.mutable_data_ptr<float>());
    } else {
      simt::conv2d_simt_kernel<false><<<grid, simt::kThreads, 0, stream>>>(
          p, xc.const_data_ptr<float>(), wk.const_data_ptr<float>(), b, out.mutable_data_ptr<float>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }

  // 16-byte A chunks need 8 | C_in (a chunk never straddles a pixel) and an aligned base;
  // reorder_weight returns an aligned wk with ldw % 8 == 0 for the B chunks.
  const bool vec_a = g.C % 8 == 0 && aligned16(xc.const_data_ptr());
  TORCH_INTERNAL_ASSERT(aligned16(wk.const_data_ptr()) && ldw % 8 == 0);
  AT_DISPATCH_SWITCH(x.scalar_type(), "conv2d_bias_act_cuda",
      AT_DISPATCH_CASE(at::kHalf, [&] {
        const scalar_t* b = has_bias ? bias.const_data_ptr<scalar_t>() : nullptr;
        if (vec_a) launch_tc<scalar_t, true>(p, xc, wk, b, out, nhwc_out, stream);
        else launch_tc<scalar_t, false>(p, xc, wk, b, out, nhwc_out, stream);
      })
      AT_DISPATCH_CASE(at::kBFloat16, [&] {
        const scalar_t* b = has_bias ? bias.const_data_ptr<scalar_t>() : nullptr;
        if (vec_a) launch_tc<scalar_t, true>(p, xc, wk, b, out, nhwc_out, stream);
        else launch_tc<scalar_t, false>(p, xc, wk, b, out, nhwc_out, stream);
      }));
  return out;
}

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

  // Replaceable stage 1: the activation's gradient.
  const at::Tensor grad_pre = is_relu(activation) ? relu_grad(grad_out, out, fmt) : grad_out.contiguous(fmt);
  // Replaceable stage 2: data and weight gradients (cuDNN through ATen), only those asked
  // for: grad_x of a stride-4 first layer costs several times the rest of its backward.
  if (want_x || want_w) {
    const at::MemoryFormat x_fmt = preferred_format(x, 1);
    const at::MemoryFormat w_fmt = preferred_format(weight, 1);
    if (grad_pre.numel() == 0) {
      if (want_x) grad_x = at::zeros(x.sizes(), x.options().memory_format(x_fmt));
      if (want_w) grad_w = at::zeros(weight.sizes(), weight.options().memory_format(w_fmt));
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
  m.impl("conv2d_bias_act", &conv2d_cuda::conv2d_bias_act_cuda);
  m.impl("conv2d_bias_act_backward", &conv2d_cuda::conv2d_bias_act_backward_cuda);
}

}  // namespace pyowt
