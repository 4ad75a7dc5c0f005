// CPU kernels of pyowt::conv2d_bias_act and its backward.
//
// Forward, by shape (choose_algorithm):
// - Winograd F(2x2, 3x3) / F(2x2, 5x5) (conv2d_winograd.cpp) for NCHW float32 3x3 and 5x5
//   stride-1 layers on AVX-512 CPUs where it measured faster than oneDNN (winograd_pays);
// - else oneDNN's convolution with a fused ReLU post-op (mkldnn::_convolution_pointwise,
//   found through the dispatcher because ATen exposes no C++ header for it): the same
//   primitive as at::conv2d, one pass over the output fewer;
// - else (and for convolutions too small to amortize oneDNN's set-up) at::conv2d followed
//   by an in-place relu_.
// Backward: the ReLU mask (out > 0) applied to grad_out; the input gradient of a stride-1
// 3x3 or 5x5 layer through the Winograd forward and its weight gradient through the
// Winograd weight gradient (conv2d_winograd_wgrad.cpp) where they pay, the rest through
// at::convolution_backward for the gradients output_mask asks for.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/MemoryFormat.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <optional>
#include <string>
#include <vector>

#include "channel_layout.h"
#include "conv2d_cpu.h"
#include "conv2d_output_mask.h"
#include "conv2d_winograd.h"
#include "winograd_kernels.h"

namespace pyowt {
namespace {

struct ConvGeometry {
  int64_t n, c_in, h, w, c_out, r, s, h_out, w_out;
};

void check_pair(at::IntArrayRef v, const char* name, int64_t min_value) {
  TORCH_CHECK(v.size() == 2, name, " must have 2 elements, got ", v.size(), ": ", v);
  TORCH_CHECK(v[0] >= min_value && v[1] >= min_value, name, " must be >= ", min_value,
              " in both axes, got ", v);
}

bool is_relu(c10::string_view activation) {
  TORCH_CHECK(activation == "relu" || activation == "none",
              "activation must be \"relu\" or \"none\", got \"", std::string(activation), "\"");
  return activation == "relu";
}

ConvGeometry check_conv_args(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(x.dim() == 4, "x must be 4-d (N, C_in, H, W), got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 4, "weight must be 4-d (C_out, C_in/groups, R, S), got shape ",
              weight.sizes());
  check_float_dtype(x, "x");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight dtype ", weight.scalar_type(),
              " differs from x dtype ", x.scalar_type());
  TORCH_CHECK(weight.device() == x.device(), "weight is on ", weight.device(), " but x is on ",
              x.device());
  check_pair(stride, "stride", 1);
  check_pair(padding, "padding", 0);
  check_pair(dilation, "dilation", 1);
  TORCH_CHECK(groups >= 1, "groups must be >= 1, got ", groups);
  ConvGeometry g{x.size(0), x.size(1), x.size(2), x.size(3),
                 weight.size(0), weight.size(2), weight.size(3), 0, 0};
  TORCH_CHECK(g.c_in % groups == 0 && g.c_out % groups == 0, "groups=", groups,
              " must divide C_in=", g.c_in, " and C_out=", g.c_out);
  TORCH_CHECK(weight.size(1) * groups == g.c_in, "weight has ", weight.size(1),
              " input channels per group but x has C_in=", g.c_in, " and groups=", groups,
              " (expected ", g.c_in / groups, ")");
  TORCH_CHECK(g.r >= 1 && g.s >= 1, "weight kernel size must be >= 1, got ", g.r, "x", g.s);
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == g.c_out, "bias must have shape (", g.c_out,
                ",), got ", b.sizes());
    TORCH_CHECK(b.scalar_type() == x.scalar_type(), "bias dtype ", b.scalar_type(),
                " differs from x dtype ", x.scalar_type());
    TORCH_CHECK(b.device() == x.device(), "bias is on ", b.device(), " but x is on ", x.device());
  }
  const int64_t eff_r = dilation[0] * (g.r - 1) + 1, eff_s = dilation[1] * (g.s - 1) + 1;
  const int64_t ph = g.h + 2 * padding[0], pw = g.w + 2 * padding[1];
  TORCH_CHECK(eff_r <= ph && eff_s <= pw, "dilated kernel ", eff_r, "x", eff_s,
              " is larger than the padded input ", ph, "x", pw, " (x shape ", x.sizes(),
              ", padding ", padding, ")");
  g.h_out = (ph - eff_r) / stride[0] + 1;
  g.w_out = (pw - eff_s) / stride[1] + 1;
  return g;
}

// Tensors in `fmt` with exactly the strides torch.empty(..., memory_format=fmt) gives, so
// that the fake kernels (which allocate that way) promise the real strides. Size-1
// dimensions make is_contiguous(fmt) true for several stride patterns; copy only then.
at::Tensor in_format(const at::Tensor& t, at::MemoryFormat fmt) {
  std::vector<int64_t> want;
  if (fmt == at::MemoryFormat::ChannelsLast) {
    want = c10::get_channels_last_strides_2d(t.sizes());
  } else {
    want.assign(t.dim(), 1);
    for (int64_t d = t.dim() - 2; d >= 0; --d) want[d] = want[d + 1] * std::max<int64_t>(t.size(d + 1), 1);
  }
  if (t.strides() == at::IntArrayRef(want)) return t;
  at::Tensor out = at::empty(t.sizes(), t.options().memory_format(fmt));
  out.copy_(t);
  return out;
}

// mkldnn::_convolution_pointwise if this torch registered it with a CPU kernel.
const c10::OperatorHandle* fused_conv_op() {
  static const std::optional<c10::OperatorHandle> op = []() -> std::optional<c10::OperatorHandle> {
    auto handle = c10::Dispatcher::singleton().findOp({"mkldnn::_convolution_pointwise", ""});
    if (handle.has_value() && handle->hasKernelForDispatchKey(c10::DispatchKey::CPU)) return handle;
    return std::nullopt;
  }();
  return op.has_value() ? &*op : nullptr;
}

// Below this many multiply-adds the fused primitive's per-call set-up outweighs the saved
// output pass: 45 us against 7 us for conv2d + relu_ at (1,2,5,5) * (3,2,3,3), 85 vs 78 us
// at 2.7M, 110 vs 106 us at 5.3M, even from 10M (2-core EPYC, fp32, one thread each side);
// at::conv2d also picks ATen's own kernel for the tiniest shapes.
constexpr int64_t kFusedMinMacs = int64_t(1) << 23;

int64_t multiply_adds(const ConvGeometry& g, int64_t groups) {
  return g.n * g.c_out * g.h_out * g.w_out * (g.c_in / groups) * g.r * g.s;
}

// Kernel taps that land inside the input, summed over the output positions of one axis
// (stride and dilation 1): oneDNN's direct convolution skips the padded ones.
int64_t taps_inside(int64_t size, int64_t pad, int64_t r, int64_t out) {
  int64_t taps = 0;
  for (int64_t o = 0; o < out; ++o) {
    taps += std::min(o - pad + r, size) - std::max(o - pad, int64_t(0));
  }
  return taps;
}

// Winograd F(2x2, r x r) (conv2d_winograd.cpp) instead of oneDNN's direct convolution for
// NCHW float32 3x3 / 5x5 stride-1 layers where it measured faster (2-core EPYC, batch 8
// unless said, times vs oneDNN's fused primitive). The deciding quantity is `saving`, the
// direct convolution's multiplies over the taps inside the input divided by Winograd's
// (r + 1)^2 per 2x2 tile (odd outputs waste part of their last tiles):
//   3x3: AlexNet conv3-5 (13x13, saving 1.75) 1.27-1.33x; ResNet-50 56x56 / 28x28 (2.2,
//     2.1) 1.11x / 1.6x; 7x7 (1.41) 1.14-1.26x; 5x5 (1.17) 0.77x; 3x3, AlexNet on 64x64
//     images (0.77), 0.66-0.73x. 24-48 channels 1.2-2.0x, 16 and 16 0.93-1.06x.
//   5x5 (36 positions: costlier transforms): AlexNet conv2 (27x27, 2.36) 1.71x; 28x28 and
//     14x14 (2.5, 2.3) 1.39-1.43x; 13x13 (1.97) 1.20-1.41x; 11x11 (1.85) 1.10x; 9x9
//     (1.69) 0.83-0.87x; 16 -> 32 channels 1.06x.
// It also lost where the per-call weight transform and the thread split have too few tiles
// to spread over (one 13x13 image: 49 tiles, 0.6x; two images, 4 tile blocks: 1.12x).
bool winograd_pays(const at::Tensor& x, const at::Tensor& weight, const ConvGeometry& g,
                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                   int64_t groups) {
  const bool five = g.r == 5;
  if (g.c_in < 16 || g.c_out < 16 || g.c_in * g.c_out < (five ? 1024 : 512)) return false;
  if (multiply_adds(g, groups) < kFusedMinMacs) return false;
  if (!cpu_winograd_enabled() ||
      !winograd_conv2d_accepts(x, weight, stride, padding, dilation, groups)) {
    return false;
  }
  const int64_t tiles_per_image = ((g.h_out + 1) / 2) * ((g.w_out + 1) / 2);
  const int64_t direct = taps_inside(g.h, padding[0], g.r, g.h_out) *
                         taps_inside(g.w, padding[1], g.s, g.w_out);
  const int64_t winograd = tiles_per_image * (g.r + 1) * (g.s + 1);
  if (direct * 10 < winograd * (five ? 18 : 13)) return false;
  // At least two tile blocks per thread.
  return g.n * tiles_per_image >= 2 * winograd::kTiles * at::get_num_threads();
}

// oneDNN runs float32 everywhere, but float16/bfloat16 only on CPUs with the matching ISA
// (it raises otherwise). Learn that once per dtype: 0 unknown, 1 works, -1 refused.
std::atomic<int>& low_precision_state(at::ScalarType st) {
  static std::atomic<int> half_state{0}, bf16_state{0};
  return st == at::kHalf ? half_state : bf16_state;
}

at::Tensor call_fused(const c10::OperatorHandle& op, const at::Tensor& x, const at::Tensor& w,
                      const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                      bool relu) {
  // Schema: (X, W, B?, padding, stride, dilation, groups, attr, scalars, algorithm).
  std::vector<c10::IValue> stack;
  stack.reserve(10);
  stack.emplace_back(x);
  stack.emplace_back(w);
  stack.emplace_back(bias.has_value() ? c10::IValue(*bias) : c10::IValue());
  stack.emplace_back(padding.vec());
  stack.emplace_back(stride.vec());
  stack.emplace_back(dilation.vec());
  stack.emplace_back(groups);
  stack.emplace_back(std::string(relu ? "relu" : "none"));
  stack.emplace_back(c10::List<std::optional<at::Scalar>>());
  stack.emplace_back(c10::IValue());
  op.callBoxed(&stack);
  return stack.at(0).toTensor();
}

enum class CpuConvAlgorithm { kWinograd, kOneDnn, kAten };

CpuConvAlgorithm choose_algorithm(const at::Tensor& x, const at::Tensor& weight,
                                  const ConvGeometry& g, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation,
                                  int64_t groups) {
  if (winograd_pays(x, weight, g, stride, padding, dilation, groups)) {
    return CpuConvAlgorithm::kWinograd;
  }
  const bool nonempty = x.numel() > 0 && g.c_out > 0;
  if (fused_conv_op() == nullptr || !nonempty || multiply_adds(g, groups) < kFusedMinMacs) {
    return CpuConvAlgorithm::kAten;
  }
  const at::ScalarType st = x.scalar_type();
  if (st != at::kFloat && low_precision_state(st).load() < 0) return CpuConvAlgorithm::kAten;
  return CpuConvAlgorithm::kOneDnn;
}

at::Tensor conv2d_bias_act_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                               c10::string_view activation) {
  const bool relu = is_relu(activation);
  const ConvGeometry g = check_conv_args(x_in, weight, bias, stride, padding, dilation, groups);
  TORCH_CHECK(x_in.device().is_cpu(), "conv2d_bias_act (cpu) got x on ", x_in.device());
  const auto fmt = preferred_format(x_in, 1);
  const at::Tensor x = x_in.contiguous(fmt);

  const CpuConvAlgorithm algorithm =
      choose_algorithm(x, weight, g, stride, padding, dilation, groups);
  if (algorithm == CpuConvAlgorithm::kWinograd) {
    return winograd_conv2d(x, weight, bias, padding, relu);
  }
  if (algorithm == CpuConvAlgorithm::kOneDnn) {
    const c10::OperatorHandle& op = *fused_conv_op();
    const at::ScalarType st = x.scalar_type();
    if (st == at::kFloat) {
      return in_format(call_fused(op, x, weight, bias, stride, padding, dilation, groups, relu), fmt);
    }
    std::atomic<int>& state = low_precision_state(st);
    try {
      at::Tensor out = call_fused(op, x, weight, bias, stride, padding, dilation, groups, relu);
      state.store(1);
      return in_format(out, fmt);
    } catch (const c10::Error&) {
      // The arguments were checked above, so a refusal is oneDNN lacking this dtype.
      if (state.load() == 1) throw;
      state.store(-1);
    }
  }
  at::Tensor out = at::conv2d(x, weight, bias, stride, padding, dilation, groups);
  if (relu) out.relu_();
  return in_format(out, fmt);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_bias_act_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x_in, const at::Tensor& weight,
    const at::Tensor& out, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, c10::string_view activation, bool has_bias,
    const c10::List<bool>& output_mask) {
  const bool relu = is_relu(activation);
  const ConvGeometry g =
      check_conv_args(x_in, weight, std::nullopt, stride, padding, dilation, groups);
  TORCH_CHECK(x_in.device().is_cpu(), "conv2d_bias_act_backward (cpu) got x on ", x_in.device());
  const auto [want_x, want_w, want_b_arg] = read_output_mask(output_mask, "conv2d_bias_act_backward");
  const bool want_b = has_bias && want_b_arg;
  const std::vector<int64_t> out_shape{g.n, g.c_out, g.h_out, g.w_out};
  TORCH_CHECK(out.sizes() == at::IntArrayRef(out_shape), "out shape ", out.sizes(),
              " differs from the convolution's output shape ", at::IntArrayRef(out_shape));
  TORCH_CHECK(grad_out.sizes() == out.sizes(), "grad_out shape ", grad_out.sizes(),
              " differs from out shape ", out.sizes());
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{grad_out, "grad_out"},
                                std::pair<const at::Tensor&, const char*>{out, "out"}}) {
    TORCH_CHECK(t.scalar_type() == x_in.scalar_type(), name, " dtype ", t.scalar_type(),
                " differs from x dtype ", x_in.scalar_type());
    TORCH_CHECK(t.device() == x_in.device(), name, " is on ", t.device(), " but x is on ",
                x_in.device());
  }
  // Distinct (0,) tensors: outputs of a custom op may not alias each other.
  at::Tensor grad_x = want_x ? at::Tensor() : at::empty({0}, x_in.options());
  at::Tensor grad_w = want_w ? at::Tensor() : at::empty({0}, x_in.options());
  at::Tensor grad_b = want_b ? at::Tensor() : at::empty({0}, x_in.options());
  if (!want_x && !want_w && !want_b) return {grad_x, grad_w, grad_b};

  const auto fmt = preferred_format(x_in, 1);
  const auto w_fmt = preferred_format(weight, 1);
  if (x_in.numel() == 0 || g.c_out == 0) {
    if (want_x) grad_x = at::zeros(x_in.sizes(), x_in.options().memory_format(fmt));
    if (want_w) grad_w = at::zeros(weight.sizes(), weight.options().memory_format(w_fmt));
    if (want_b) grad_b = at::zeros({g.c_out}, x_in.options());
    return {grad_x, grad_w, grad_b};
  }
  const at::Tensor x = x_in.contiguous(fmt);
  // grad_out where out > 0, else 0: the ReLU's derivative recovered from its output.
  at::Tensor g_masked = relu ? at::threshold_backward(grad_out, out, 0) : grad_out;
  g_masked = g_masked.contiguous(fmt);

  std::optional<std::vector<int64_t>> bias_sizes;
  if (want_b) bias_sizes = std::vector<int64_t>{g.c_out};
  // oneDNN's 16-bit weight gradient on AMX CPUs returned non-finite values for a kernel
  // window larger than the input (seen on a Xeon with amx_bf16, torch 2.11: a (1,1,9,1)
  // bf16 input, an 11x3 kernel, padding 1, even with a zero grad_out; ATen's own
  // convolution_backward did the same). Such convolutions, and small ones, whose cost the
  // conversions do not change, run the backward in float32 and round its results once.
  const at::ScalarType st = x.scalar_type();
  const int64_t window_h = (g.r - 1) * dilation[0] + 1, window_w = (g.s - 1) * dilation[1] + 1;
  const bool via_float = st != at::kFloat &&
                         (window_h > g.h || window_w > g.w || multiply_adds(g, groups) < kFusedMinMacs);
  const at::ScalarType compute_type = via_float ? at::kFloat : st;
  // The input gradient of a stride-1 r x r convolution with padding p is the convolution
  // of grad_out with the weight flipped and transposed, padding r - 1 - p: the Winograd
  // forward computes it where it pays, as for the forward.
  bool winograd_x = false;
  const bool unit_steps = stride[0] == 1 && stride[1] == 1 && dilation[0] == 1 && dilation[1] == 1;
  if (want_x && st == at::kFloat && unit_steps && (g.r == 3 || g.r == 5) && g.s == g.r &&
      padding[0] <= g.r - 1 && padding[1] <= g.r - 1 && groups == 1) {
    const std::array<int64_t, 2> pad_t{g.r - 1 - padding[0], g.r - 1 - padding[1]};
    const at::Tensor w_t = weight.transpose(0, 1);  // a view: the choice reads only its sizes
    const ConvGeometry gt = check_conv_args(g_masked, w_t, std::nullopt, stride, pad_t, dilation, 1);
    if (winograd_pays(g_masked, w_t, gt, stride, pad_t, dilation, 1)) {
      grad_x = winograd_conv2d(g_masked, w_t.flip({2, 3}).contiguous(), std::nullopt, pad_t,
                               /*relu=*/false);
      winograd_x = true;
    }
  }
  // The weight gradient of the layers the forward runs by Winograd, by Winograd too.
  bool winograd_w = false;
  if (want_w && st == at::kFloat && winograd_pays(x, weight, g, stride, padding, dilation, groups)) {
    grad_w = in_format(winograd_conv2d_weight_grad(x, g_masked, g.r, padding), w_fmt);
    winograd_w = true;
  }
  // oneDNN (through ATen) computes only what the mask asks for; the rest comes back
  // undefined and keeps its (0,) placeholder.
  const bool aten_x = want_x && !winograd_x, aten_w = want_w && !winograd_w;
  // oneDNN computes the bias gradient inside its weight-gradient primitive: asked for the
  // bias alone it still runs the whole primitive (11 ms of 12 for AlexNet conv3's backward
  // at batch 8), so without an ATen weight gradient the bias gradient is a plain sum.
  const bool aten_b = want_b && aten_w;
  if (want_b && !aten_b) grad_b = g_masked.sum({0, 2, 3});
  if (!(aten_x || aten_w || aten_b)) return {grad_x, grad_w, grad_b};
  at::Tensor gx, gw, gb;
  std::tie(gx, gw, gb) = at::convolution_backward(
      g_masked.to(compute_type), x.to(compute_type), weight.to(compute_type),
      bias_sizes.has_value() ? at::OptionalIntArrayRef(*bias_sizes) : std::nullopt,
      stride, padding, dilation, /*transposed=*/false, /*output_padding=*/{0, 0}, groups,
      {aten_x, aten_w, aten_b});
  if (aten_x) grad_x = in_format(gx.to(st), fmt);
  if (aten_w) grad_w = in_format(gw.to(st), w_fmt);
  if (aten_b) grad_b = gb.to(st);
  return {grad_x, grad_w, grad_b};
}

}  // namespace

std::string cpu_conv2d_algorithm(const at::Tensor& x, const at::Tensor& weight,
                                 at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation, int64_t groups) {
  const ConvGeometry g = check_conv_args(x, weight, std::nullopt, stride, padding, dilation, groups);
  const at::Tensor xc = x.contiguous(preferred_format(x, 1));
  switch (choose_algorithm(xc, weight, g, stride, padding, dilation, groups)) {
    case CpuConvAlgorithm::kWinograd: return "winograd";
    case CpuConvAlgorithm::kOneDnn: return "onednn";
    default: return "aten";
  }
}

TORCH_LIBRARY_IMPL(pyowt, CPU, m) {
  m.impl("conv2d_bias_act", &conv2d_bias_act_cpu);
  m.impl("conv2d_bias_act_backward", &conv2d_bias_act_backward_cpu);
}

}  // namespace pyowt
