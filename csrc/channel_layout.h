// Shared argument checks and memory-layout helper for ops that broadcast a per-channel
// vector along one dimension (bias + activation epilogues).
#pragma once

#include <ATen/ATen.h>

namespace pyowt {

// A dense tensor seen as [outer, channels, inner] in memory order.
struct ChannelLayout {
  int64_t outer;
  int64_t channels;
  int64_t inner;
};

inline int64_t normalize_dim(int64_t dim, int64_t ndim, const char* arg) {
  TORCH_CHECK(ndim >= 1, arg, " must have at least 1 dimension, got a 0-d tensor");
  TORCH_CHECK(dim >= -ndim && dim < ndim, "dim must be in [", -ndim, ", ", ndim - 1,
              "] for a ", ndim, "-d ", arg, ", got ", dim);
  return dim < 0 ? dim + ndim : dim;
}

inline void check_float_dtype(const at::Tensor& t, const char* arg) {
  auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, arg,
              " must be float32, float16 or bfloat16, got ", st);
}

// The memory format to keep: channels-last inputs broadcast over their innermost dim and
// need no copy; anything else that is not contiguous is copied once.
inline at::MemoryFormat preferred_format(const at::Tensor& x, int64_t dim) {
  if (dim == 1 && x.dim() == 4 && !x.is_contiguous() &&
      x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  if (dim == 1 && x.dim() == 5 && !x.is_contiguous() &&
      x.is_contiguous(at::MemoryFormat::ChannelsLast3d)) {
    return at::MemoryFormat::ChannelsLast3d;
  }
  return at::MemoryFormat::Contiguous;
}

inline ChannelLayout channel_layout(const at::Tensor& x, int64_t dim, at::MemoryFormat fmt) {
  ChannelLayout l{1, x.size(dim), 1};
  if (fmt != at::MemoryFormat::Contiguous) {
    // N, spatial..., C in memory: the channel is innermost.
    l.outer = x.numel() / std::max<int64_t>(l.channels, 1);
    return l;
  }
  for (int64_t d = 0; d < dim; ++d) l.outer *= x.size(d);
  for (int64_t d = dim + 1; d < x.dim(); ++d) l.inner *= x.size(d);
  return l;
}

inline void check_bias_relu_args(const at::Tensor& x, const at::Tensor& bias, int64_t dim) {
  check_float_dtype(x, "x");
  TORCH_CHECK(bias.dim() == 1, "bias must be 1-d, got a ", bias.dim(), "-d tensor of shape ",
              bias.sizes());
  TORCH_CHECK(bias.size(0) == x.size(dim), "bias has ", bias.size(0),
              " elements but x has ", x.size(dim), " channels along dim ", dim,
              " (x shape ", x.sizes(), ")");
  TORCH_CHECK(bias.scalar_type() == x.scalar_type(), "bias dtype ", bias.scalar_type(),
              " differs from x dtype ", x.scalar_type());
  TORCH_CHECK(bias.device() == x.device(), "bias is on ", bias.device(), " but x is on ",
              x.device());
}

inline void check_bias_relu_backward_args(const at::Tensor& grad, const at::Tensor& out) {
  check_float_dtype(out, "out");
  TORCH_CHECK(grad.sizes() == out.sizes(), "grad_out shape ", grad.sizes(),
              " differs from out shape ", out.sizes());
  TORCH_CHECK(grad.scalar_type() == out.scalar_type(), "grad_out dtype ", grad.scalar_type(),
              " differs from out dtype ", out.scalar_type());
  TORCH_CHECK(grad.device() == out.device(), "grad_out is on ", grad.device(),
              " but out is on ", out.device());
}

}  // namespace pyowt
