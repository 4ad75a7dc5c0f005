// Shared pieces of the CUDA conv2d_bias_act kernels (conv2d.cu): argument checks, the
// geometry the kernels index with, the row/column decoders of the implicit GEMM, the
// bias + activation epilogue and the cp.async wrappers.
//
// Implicit GEMM view of a convolution (both kernels):
//   out[m, co] = sum_k A[m, k] * B[co, k]
//   m  = (n, oh, ow)  row of the GEMM, M = N * H_out * W_out
//   co = output channel, N_gemm = C_out
//   k  = (r, s, c)    with c innermost, K = R * S * C_in
//   A[m, k] = x_nhwc[n, oh*sh - ph + r*dh, ow*sw - pw + s*dw, c]  (0 outside the image)
//   B[co, k] = weight[co, c, r, s], stored (C_out, ldw) with k contiguous (ldw >= K,
//              columns K..ldw-1 zero).
// The Python emulation in tests/ops/conv2d_cuda_emulation.py mirrors this index mapping; keep
// the two in sync.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <string>

#include "channel_layout.h"

namespace pyowt {
namespace conv2d_cuda {

// Everything a kernel needs, as 32-bit ints: the host only launches our kernels when every
// index (element offsets of x, weight, out and the padded image coordinates) fits, see
// fits_int32(); larger problems take the ATen fallback.
struct ConvParams {
  int N, C, H, W;      // input (C = C_in)
  int Cout, R, S;      // weight
  int Ho, Wo;          // output
  int sh, sw, ph, pw, dh, dw;
  int M, K;            // GEMM sizes: M = N * Ho * Wo, K = R * S * C
  int ldw;             // row pitch of the reordered weight (>= K)
  int HoWo, HWC;       // Ho * Wo, H * W * C
  bool relu;
};

// Geometry as the checks see it (64-bit, before any narrowing).
struct Geometry {
  int64_t N, C, H, W, Cout, R, S, Ho, Wo;
  int64_t sh, sw, ph, pw, dh, dw, groups;
};

inline std::string to_string(c10::string_view s) { return std::string(s.data(), s.size()); }

inline bool is_relu(c10::string_view activation) {
  return activation == c10::string_view("relu");
}

inline void check_activation(c10::string_view activation, const char* op) {
  TORCH_CHECK(activation == c10::string_view("relu") || activation == c10::string_view("none"),
              op, ": activation must be \"relu\" or \"none\", got \"", to_string(activation), "\"");
}

inline void check_pair(at::IntArrayRef v, const char* name, const char* op) {
  TORCH_CHECK(v.size() == 2, op, ": ", name, " must have 2 elements, got ", v.size(), " (", v, ")");
}

// Every user-facing precondition of the forward (and, with the same arguments, of the
// backward); returns the geometry.
inline Geometry check_conv2d_args(const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                  c10::string_view activation, const char* op) {
  TORCH_CHECK(x.defined() && weight.defined(), op, ": x and weight must be defined tensors");
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-d (N, C_in, H, W), got a ", x.dim(),
              "-d tensor of shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 4, op, ": weight must be 4-d (C_out, C_in/groups, R, S), got a ",
              weight.dim(), "-d tensor of shape ", weight.sizes());
  check_float_dtype(x, "x");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight dtype ", weight.scalar_type(),
              " differs from x dtype ", x.scalar_type());
  TORCH_CHECK(x.is_cuda(), op, " (cuda): x must be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK(weight.device() == x.device(), op, ": weight is on ", weight.device(),
              " but x is on ", x.device());
  check_pair(stride, "stride", op);
  check_pair(padding, "padding", op);
  check_pair(dilation, "dilation", op);
  TORCH_CHECK(stride[0] > 0 && stride[1] > 0, op, ": stride must be positive, got ", stride);
  TORCH_CHECK(dilation[0] > 0 && dilation[1] > 0, op, ": dilation must be positive, got ", dilation);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, op, ": padding must be non-negative, got ", padding);
  TORCH_CHECK(groups > 0, op, ": groups must be positive, got ", groups);
  check_activation(activation, op);

  Geometry g{};
  g.N = x.size(0);
  g.C = x.size(1);
  g.H = x.size(2);
  g.W = x.size(3);
  g.Cout = weight.size(0);
  g.R = weight.size(2);
  g.S = weight.size(3);
  g.sh = stride[0];
  g.sw = stride[1];
  g.ph = padding[0];
  g.pw = padding[1];
  g.dh = dilation[0];
  g.dw = dilation[1];
  g.groups = groups;
  TORCH_CHECK(g.C % groups == 0, op, ": groups=", groups, " must divide the ", g.C,
              " input channels of x (shape ", x.sizes(), ")");
  TORCH_CHECK(g.Cout % groups == 0, op, ": groups=", groups, " must divide the ", g.Cout,
              " output channels of weight (shape ", weight.sizes(), ")");
  TORCH_CHECK(weight.size(1) * groups == g.C, op, ": weight has ", weight.size(1),
              " input channels per group (shape ", weight.sizes(), ") but x has ", g.C,
              " channels in ", groups, " group(s), expected ", g.C / groups);
  TORCH_CHECK(g.R > 0 && g.S > 0, op, ": weight's kernel must be at least 1x1, got ", g.R, "x", g.S);
  const int64_t eff_r = g.dh * (g.R - 1) + 1;
  const int64_t eff_s = g.dw * (g.S - 1) + 1;
  TORCH_CHECK(eff_r <= g.H + 2 * g.ph && eff_s <= g.W + 2 * g.pw, op, ": the (dilated) kernel ",
              eff_r, "x", eff_s, " is larger than the padded input ", g.H + 2 * g.ph, "x",
              g.W + 2 * g.pw, " (x shape ", x.sizes(), ", padding ", padding, ", dilation ",
              dilation, ")");
  g.Ho = (g.H + 2 * g.ph - eff_r) / g.sh + 1;
  g.Wo = (g.W + 2 * g.pw - eff_s) / g.sw + 1;
  if (bias.has_value() && bias->defined()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == g.Cout, op, ": bias must have shape (", g.Cout,
                ",) to match weight's C_out, got shape ", b.sizes());
    TORCH_CHECK(b.scalar_type() == x.scalar_type(), op, ": bias dtype ", b.scalar_type(),
                " differs from x dtype ", x.scalar_type());
    TORCH_CHECK(b.device() == x.device(), op, ": bias is on ", b.device(), " but x is on ",
                x.device());
  }
  return g;
}

// True when every index our kernels form fits comfortably in an int (with headroom for a
// block tile past the end and for padded coordinates); otherwise the caller falls back.
inline bool fits_int32(const Geometry& g, int64_t ldw, int64_t tile_m, int64_t tile_n) {
  constexpr int64_t kLimit = (int64_t{1} << 30);
  const int64_t M = g.N * g.Ho * g.Wo;
  return g.N * g.C * g.H * g.W < kLimit && g.Cout * ldw < kLimit && M * g.Cout < kLimit &&
         M + tile_m < kLimit && g.H + 2 * g.ph + g.dh * g.R + g.sh < kLimit &&
         g.W + 2 * g.pw + g.dw * g.S + g.sw < kLimit && g.R * g.S * g.C + 64 < kLimit &&
         (g.Cout + tile_n - 1) / tile_n <= 65535;
}

inline ConvParams make_params(const Geometry& g, int64_t ldw, bool relu) {
  ConvParams p{};
  p.N = static_cast<int>(g.N);
  p.C = static_cast<int>(g.C);
  p.H = static_cast<int>(g.H);
  p.W = static_cast<int>(g.W);
  p.Cout = static_cast<int>(g.Cout);
  p.R = static_cast<int>(g.R);
  p.S = static_cast<int>(g.S);
  p.Ho = static_cast<int>(g.Ho);
  p.Wo = static_cast<int>(g.Wo);
  p.sh = static_cast<int>(g.sh);
  p.sw = static_cast<int>(g.sw);
  p.ph = static_cast<int>(g.ph);
  p.pw = static_cast<int>(g.pw);
  p.dh = static_cast<int>(g.dh);
  p.dw = static_cast<int>(g.dw);
  p.M = static_cast<int>(g.N * g.Ho * g.Wo);
  p.K = static_cast<int>(g.R * g.S * g.C);
  p.ldw = static_cast<int>(ldw);
  p.HoWo = static_cast<int>(g.Ho * g.Wo);
  p.HWC = static_cast<int>(g.H * g.W * g.C);
  p.relu = relu;
  return p;
}

// ---- device helpers ------------------------------------------------------------------

// One GEMM row m = (n, oh, ow): the image base offset and the top-left input coordinate of
// its receptive field. ok is false past the last row (the tile overhangs M).
struct RowInfo {
  int base;  // n * H * W * C
  int ih0;   // oh * sh - ph
  int iw0;   // ow * sw - pw
  bool ok;
};

// GEMM row m -> its pixel (n, y, x) among N images of Ho x Wo; a row past M decodes as
// row 0 and returns false.
__device__ __forceinline__ bool split_row(const ConvParams& p, int m, int& n, int& y, int& x) {
  const bool ok = m < p.M;
  const int mm = ok ? m : 0;
  n = mm / p.HoWo;
  const int pix = mm - n * p.HoWo;
  y = pix / p.Wo;
  x = pix - y * p.Wo;
  return ok;
}

__device__ __forceinline__ RowInfo decode_row(const ConvParams& p, int m) {
  RowInfo ri;
  int n, oh, ow;
  ri.ok = split_row(p, m, n, oh, ow);
  ri.base = n * p.HWC;
  ri.ih0 = oh * p.sh - p.ph;
  ri.iw0 = ow * p.sw - p.pw;
  return ri;
}

// k -> (r, s, c) for k = (r * S + s) * C + c. Past K the values are meaningless but
// bounded (r <= R), and every caller masks them with k < K.
__device__ __forceinline__ void decode_k(const ConvParams& p, int k, int& r, int& s, int& c) {
  const int rs = k / p.C;
  c = k - rs * p.C;
  r = rs / p.S;
  s = rs - r * p.S;
}

// Element offset of A[m, k] in the NHWC input, and whether it lies inside the image.
__device__ __forceinline__ bool a_offset(const ConvParams& p, const RowInfo& ri, int r, int s, int c,
                                         int& off) {
  const int ih = ri.ih0 + r * p.dh;
  const int iw = ri.iw0 + s * p.dw;
  const bool ok = ri.ok && ih >= 0 && ih < p.H && iw >= 0 && iw < p.W;
  off = ok ? ri.base + (ih * p.W + iw) * p.C + c : 0;
  return ok;
}

// ---- the data gradient as the same implicit GEMM ----------------------------------------
// grad_x[n, ih, iw, c] = sum over (r, s, co) of grad_pre[n, oh, ow, co] * weight[co, c, r, s]
// for the taps that land on an output pixel: ih + ph - r*dh = oh*sh with 0 <= oh < H_out
// (and likewise along w). That is the forward's GEMM with the roles moved (dgrad_geometry
// in conv2d_backward.cu): rows m = (n, ih, iw) of x, columns c, k = (r, s, co) with co
// innermost, A = the NHWC grad_pre gathered as below, B[c, k] = the weight stored
// (C_in, R, S, C_out). In those ConvParams C, H, W are grad_pre's C_out, H_out, W_out; Cout,
// Ho, Wo are x's C_in, H, W; stride, padding and dilation are the forward's.

// Row m = (n, ih, iw) of the data-gradient GEMM: RowInfo with ih0 = ih + ph, iw0 = iw + pw.
__device__ __forceinline__ RowInfo decode_row_dgrad(const ConvParams& p, int m) {
  RowInfo ri;
  int n, ih, iw;
  ri.ok = split_row(p, m, n, ih, iw);
  ri.base = n * p.HWC;
  ri.ih0 = ih + p.ph;
  ri.iw0 = iw + p.pw;
  return ri;
}

// Element offset of grad_pre[n, oh, ow, c] for tap (r, s) of row ri, and whether the tap
// lands on an output pixel (a multiple of the stride, inside H_out x W_out).
__device__ __forceinline__ bool a_offset_dgrad(const ConvParams& p, const RowInfo& ri, int r, int s,
                                               int c, int& off) {
  const int th = ri.ih0 - r * p.dh;
  const int tw = ri.iw0 - s * p.dw;
  const int oh = p.sh == 1 ? th : th / p.sh;
  const int ow = p.sw == 1 ? tw : tw / p.sw;
  const bool ok = ri.ok && th >= 0 && tw >= 0 && oh * p.sh == th && ow * p.sw == tw && oh < p.H &&
                  ow < p.W;
  off = ok ? ri.base + (oh * p.W + ow) * p.C + c : 0;
  return ok;
}

// Offset of out[m, co] for an NHWC (channels_last) or NCHW output.
template <bool kNhwcOut>
__device__ __forceinline__ int out_offset(const ConvParams& p, int m, int co) {
  if constexpr (kNhwcOut) {
    return m * p.Cout + co;
  } else {
    const int n = m / p.HoWo;
    const int pix = m - n * p.HoWo;
    return (n * p.Cout + co) * p.HoWo + pix;
  }
}

// bias + activation on the fp32 accumulator. relu keeps NaN as NaN, like torch.relu.
template <typename scalar_t>
__device__ __forceinline__ float epilogue_value(const ConvParams& p, float v,
                                                const scalar_t* __restrict__ bias, int co) {
  if (bias != nullptr) v += static_cast<float>(bias[co]);
  if (p.relu && v < 0.f) v = 0.f;
  return v;
}

// 16-byte global -> shared copy that bypasses registers (sm_80+). When pred is false the
// 16 destination bytes are zero-filled and nothing is read (src-size 0); callers still pass
// a valid, aligned address.
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, bool pred) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  const int src_bytes = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src),
               "r"(src_bytes)
               : "memory");
#else
  // Never reached: the host launches the tensor-core kernel only on sm_80+.
  (void)smem_dst;
  (void)gmem_src;
  (void)pred;
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Wait until at most N committed groups of this thread are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

}  // namespace conv2d_cuda
}  // namespace pyowt
