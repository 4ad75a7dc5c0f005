// CPU kernels of pyowt::bias_relu and its backward.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "channel_layout.h"

namespace pyowt {
namespace {

constexpr int64_t kGrain = 32768;

at::Tensor bias_relu_cpu(const at::Tensor& x_in, const at::Tensor& bias_in, int64_t dim) {
  dim = normalize_dim(dim, x_in.dim(), "x");
  check_bias_relu_args(x_in, bias_in, dim);
  TORCH_CHECK(x_in.device().is_cpu(), "bias_relu (cpu) got x on ", x_in.device());
  const auto fmt = preferred_format(x_in, dim);
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor bias = bias_in.contiguous();
  at::Tensor out = at::empty_like(x, x.options().memory_format(fmt));
  const ChannelLayout l = channel_layout(x, dim, fmt);
  if (x.numel() == 0) return out;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bias_relu_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* bp = bias.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t C = l.channels, inner = l.inner;
    // Each run of `inner` elements shares one channel.
    at::parallel_for(0, l.outer * C, std::max<int64_t>(1, kGrain / inner), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const opmath_t b = static_cast<opmath_t>(bp[r % C]);
        const scalar_t* xr = xp + r * inner;
        scalar_t* yr = op + r * inner;
        for (int64_t i = 0; i < inner; ++i) {
          const opmath_t v = static_cast<opmath_t>(xr[i]) + b;
          yr[i] = static_cast<scalar_t>(v > opmath_t(0) ? v : opmath_t(0));
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> bias_relu_backward_cpu(const at::Tensor& grad_in,
                                                          const at::Tensor& out_in, int64_t dim) {
  dim = normalize_dim(dim, out_in.dim(), "out");
  check_bias_relu_backward_args(grad_in, out_in);
  TORCH_CHECK(out_in.device().is_cpu(), "bias_relu_backward (cpu) got out on ", out_in.device());
  const auto fmt = preferred_format(out_in, dim);
  const at::Tensor out = out_in.contiguous(fmt);
  const at::Tensor grad = grad_in.contiguous(fmt);
  at::Tensor grad_x = at::empty_like(out, out.options().memory_format(fmt));
  const ChannelLayout l = channel_layout(out, dim, fmt);
  at::Tensor grad_bias = at::zeros({l.channels}, out.options());
  if (out.numel() == 0) return {grad_x, grad_bias};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "bias_relu_backward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const scalar_t* yp = out.const_data_ptr<scalar_t>();
    scalar_t* dxp = grad_x.mutable_data_ptr<scalar_t>();
    const int64_t C = l.channels, inner = l.inner, outer = l.outer;
    // Fused mask + bias-gradient: each chunk of `outer` keeps its own per-channel partial
    // sums (in opmath precision), combined in a fixed order so results are deterministic.
    const int64_t chunks = std::min<int64_t>(outer, std::max<int64_t>(1, at::get_num_threads() * 4));
    std::vector<opmath_t> partial(static_cast<size_t>(chunks * C), opmath_t(0));
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t chunk = c0; chunk < c1; ++chunk) {
        const int64_t o0 = outer * chunk / chunks, o1 = outer * (chunk + 1) / chunks;
        opmath_t* acc = partial.data() + chunk * C;
        for (int64_t o = o0; o < o1; ++o) {
          for (int64_t c = 0; c < C; ++c) {
            const int64_t base = (o * C + c) * inner;
            opmath_t s = 0;
            for (int64_t i = 0; i < inner; ++i) {
              const opmath_t g = yp[base + i] > scalar_t(0) ? static_cast<opmath_t>(gp[base + i]) : opmath_t(0);
              dxp[base + i] = static_cast<scalar_t>(g);
              s += g;
            }
            acc[c] += s;
          }
        }
      }
    });
    scalar_t* gbp = grad_bias.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      opmath_t s = 0;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) s += partial[chunk * C + c];
      gbp[c] = static_cast<scalar_t>(s);
    }
  });
  return {grad_x, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyowt, CPU, m) {
  m.impl("bias_relu", &bias_relu_cpu);
  m.impl("bias_relu_backward", &bias_relu_backward_cpu);
}

}  // namespace pyowt
