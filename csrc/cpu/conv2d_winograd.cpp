// Winograd F(2x2, 3x3) and F(2x2, 5x5) convolution forward on AVX-512, NCHW float32.
//
// Why: on the 2-core EPYC (Zen 4) oneDNN's direct convolution already runs AlexNet's and
// ResNet's 3x3 layers at the FMA units' peak (~230 GFLOP/s), so fusing the ReLU alone saves
// only its pass over the output. F(2x2, r x r) computes a 2x2 output tile from an
// (r+1) x (r+1) input patch with (r+1)^2 multiplies instead of 4 r^2: 2.25x fewer for 3x3,
// 2.78x for 5x5. An earlier try that ran the GEMMs through at::bmm between whole-tensor
// transform passes lost to oneDNN (transforms memory-bound, GEMMs at ~130 GFLOP/s); this
// one is blocked so that every transform works on cache-resident data:
//
//   per block of kTiles output tiles (any images, any rows):
//     input transform: V[xi][c][tile] = (B^T d B)[xi] for the block's input patches d,
//       16 tiles per AVX-512 vector (masked gathers read the patches, zero padding comes
//       from the masks);                                           -> V in L2
//     for each block of kRows output channels:
//       for each of the (r+1)^2 transform positions xi:
//         M[xi] = U[xi][rows][c] . V[xi][c][tiles]  (register-blocked microkernel)
//       output transform: out = A^T M A + bias, ReLU, masked scatters into NCHW.  (L1)
//
// U (the transformed weights, laid out [row block][xi][c][row]) is computed once per
// call and streamed in order. The matrices use the interpolation points 0, 1, -1 (3x3)
// and 0, 1, -1, 2, -2 (5x5), plus infinity. Accuracy: relative error 2-3e-7 against
// float64 on the AlexNet 3x3 layers, about twice the direct convolution's; larger for 5x5
// (its transforms carry factors up to 5 and 1/24). A NaN or infinity in the input reaches
// every output of the 2x2 tiles whose patch holds it (the transforms mix the patch), a
// superset of the direct convolution's NaN outputs; infinities can become NaN.
#include "conv2d_winograd.h"
#include "winograd_kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace pyowt {
namespace {

using namespace winograd;

std::atomic<bool>& winograd_switch() {
  static std::atomic<bool> on = [] {
    const char* v = std::getenv("PYOWT_CPU_CONV_WINOGRAD");
    return !(v != nullptr && std::string(v) == "0");
  }();
  return on;
}

bool cpu_has_avx512f() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0;
  }();
  return has;
}

// G (the filter transform) of F(2, r): rows for the points 0, 1, -1 (, 2, -2) scaled by
// the Lagrange denominators, then infinity. The input and output transforms hold B^T and
// A^T as code (transform_input_1d, transform_output_1d).
constexpr float kG3[4][3] = {{1.f, 0.f, 0.f}, {.5f, .5f, .5f}, {.5f, -.5f, .5f}, {0.f, 0.f, 1.f}};
constexpr float kG5[6][5] = {
    {1.f / 4, 0.f, 0.f, 0.f, 0.f},
    {-1.f / 6, -1.f / 6, -1.f / 6, -1.f / 6, -1.f / 6},
    {-1.f / 6, 1.f / 6, -1.f / 6, 1.f / 6, -1.f / 6},
    {1.f / 24, 1.f / 12, 1.f / 6, 1.f / 3, 2.f / 3},
    {1.f / 24, -1.f / 12, 1.f / 6, -1.f / 3, 2.f / 3},
    {0.f, 0.f, 0.f, 0.f, 1.f}};

template <int R>
constexpr float g_coef(int i, int j) {
  if constexpr (R == 3) {
    return kG3[i][j];
  } else {
    return kG5[i][j];
  }
}

// U[kb][xi][c][row] = (G g G^T)[xi] for the filter g = weight[kb * kRows + row][c], zero
// for rows past C_out; 8 filters at a time, one per lane.
template <int R>
PYOWT_AVX512 void transform_weights(const float* w, float* U, int k_out, int c_in, int64_t kb0,
                                    int64_t kb1) {
  constexpr int A = R + 1;
  const __m256i rows = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                          _mm256_set1_epi32(c_in * R * R));
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    const int valid = std::min<int64_t>(kRows, k_out - kb * kRows);
    const __m256 mask = _mm256_castsi256_ps(
        _mm256_cmpgt_epi32(_mm256_set1_epi32(valid), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
    const float* wk = w + kb * kRows * int64_t(c_in) * R * R;
    float* uk = U + kb * positions(R) * int64_t(c_in) * kRows;
    for (int c = 0; c < c_in; ++c) {
      __m256 g[R][R];
      for (int i = 0; i < R; ++i) {
        for (int j = 0; j < R; ++j) {
          g[i][j] = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), wk + (c * R + i) * R + j, rows,
                                             mask, 4);
        }
      }
      __m256 t[A][R];  // G g
      for (int a = 0; a < A; ++a) {
        for (int j = 0; j < R; ++j) {
          __m256 acc = _mm256_mul_ps(_mm256_set1_ps(g_coef<R>(a, 0)), g[0][j]);
          for (int i = 1; i < R; ++i) acc = _mm256_fmadd_ps(_mm256_set1_ps(g_coef<R>(a, i)), g[i][j], acc);
          t[a][j] = acc;
        }
      }
      for (int a = 0; a < A; ++a) {
        for (int b = 0; b < A; ++b) {  // (G g) G^T
          __m256 acc = _mm256_mul_ps(_mm256_set1_ps(g_coef<R>(b, 0)), t[a][0]);
          for (int j = 1; j < R; ++j) acc = _mm256_fmadd_ps(_mm256_set1_ps(g_coef<R>(b, j)), t[a][j], acc);
          _mm256_storeu_ps(uk + (int64_t(a * A + b) * c_in + c) * kRows, acc);
        }
      }
    }
  }
}

// Per-lane placement of 16 consecutive tiles: offsets of their input patches and output
// tiles, and which patch rows/columns and tile outputs exist (lanes past the last tile
// have no bits).
struct LaneMap {
  alignas(64) int32_t in_offset[16];
  alignas(64) int32_t out_offset[16];
  __mmask16 in_row[6] = {0, 0, 0, 0, 0, 0}, in_col[6] = {0, 0, 0, 0, 0, 0};
  __mmask16 out_mask[2][2] = {{0, 0}, {0, 0}};
};

LaneMap map_lanes(const Geometry& g, int64_t first_tile) {
  LaneMap m;
  const int per_image = g.tiles_h * g.tiles_w;
  for (int l = 0; l < 16; ++l) {
    const int64_t t = first_tile + l;
    m.in_offset[l] = 0;
    m.out_offset[l] = 0;
    if (t >= g.tiles) continue;
    const int n = int(t / per_image), rem = int(t % per_image);
    const int th = rem / g.tiles_w, tw = rem % g.tiles_w;
    const int y0 = 2 * th - g.ph, x0 = 2 * tw - g.pw, oy = 2 * th, ox = 2 * tw;
    m.in_offset[l] = n * g.c * g.h * g.w + y0 * g.w + x0;
    m.out_offset[l] = n * g.k * g.h_out * g.w_out + oy * g.w_out + ox;
    const __mmask16 bit = __mmask16(1u << l);
    for (int i = 0; i <= g.r; ++i) {
      if (y0 + i >= 0 && y0 + i < g.h) m.in_row[i] |= bit;
      if (x0 + i >= 0 && x0 + i < g.w) m.in_col[i] |= bit;
    }
    for (int a = 0; a < 2; ++a) {
      for (int b = 0; b < 2; ++b) {
        if (oy + a < g.h_out && ox + b < g.w_out) m.out_mask[a][b] |= bit;
      }
    }
  }
  return m;
}

// V[xi][c][0..15] = (B^T d B)[xi] for the 16 tiles of `m`, d the (R+1)^2 input patch of
// channel c: rows transformed into an L1 buffer, then its columns.
template <int R>
PYOWT_AVX512 void transform_input(const float* x, const LaneMap& m, const Geometry& g, float* V,
                                  int64_t xi_stride) {
  constexpr int A = R + 1;
  const __m512i base = _mm512_load_si512(m.in_offset);
  const __m512 zero = _mm512_setzero_ps();
  const int64_t plane = int64_t(g.h) * g.w;
  for (int c = 0; c < g.c; ++c) {
    const float* xc = x + c * plane;
    __m512 rows[A][A];  // rows[i] = B^T applied along the row i of the patch
    for (int i = 0; i < A; ++i) {
      __m512 d[A];
      for (int j = 0; j < A; ++j) {
        d[j] = _mm512_mask_i32gather_ps(zero, __mmask16(m.in_row[i] & m.in_col[j]), base,
                                        xc + i * g.w + j, 4);
      }
      transform_input_1d<R>(d, rows[i]);
    }
    float* vc = V + int64_t(c) * kTiles;
    for (int j = 0; j < A; ++j) {
      __m512 col[A], v[A];
      for (int i = 0; i < A; ++i) col[i] = rows[i][j];
      transform_input_1d<R>(col, v);
      for (int i = 0; i < A; ++i) _mm512_storeu_ps(vc + (i * A + j) * xi_stride, v[i]);
    }
  }
}

// y = A^T m along one axis. 3x3: A^T = [[1, 1, 1, 0], [0, 1, -1, -1]] (the infinity row
// of B^T above carries the other sign). 5x5: A^T = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 1]].
template <int R>
PYOWT_AVX512 inline void transform_output_1d(const __m512* m, __m512* y) {
  if constexpr (R == 3) {
    y[0] = _mm512_add_ps(_mm512_add_ps(m[0], m[1]), m[2]);
    y[1] = _mm512_sub_ps(_mm512_sub_ps(m[1], m[2]), m[3]);
  } else {
    y[0] = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(m[0], m[1]), _mm512_add_ps(m[2], m[3])), m[4]);
    y[1] = _mm512_add_ps(_mm512_fmadd_ps(_mm512_set1_ps(2.f), _mm512_sub_ps(m[3], m[4]),
                                         _mm512_sub_ps(m[1], m[2])),
                         m[5]);
  }
}

// out tile = A^T M A (+ bias, ReLU) for `rows` channels and the 16 tiles of `m`, M laid
// out [xi][row][tile] (xi stride kRows * kTiles).
template <int R>
PYOWT_AVX512 void transform_output(const float* M, const LaneMap& m, const Geometry& g,
                                   const float* bias, bool relu, int rows, float* out) {
  constexpr int A = R + 1;
  const __m512i offset = _mm512_load_si512(m.out_offset);
  const __m512 zero = _mm512_setzero_ps();
  const int64_t plane = int64_t(g.h_out) * g.w_out;
  for (int r = 0; r < rows; ++r) {
    __m512 s[2][A];  // A^T M, column by column
    for (int j = 0; j < A; ++j) {
      __m512 col[A], y[2];
      for (int i = 0; i < A; ++i) col[i] = _mm512_loadu_ps(M + (i * A + j) * kRows * kTiles + r * kTiles);
      transform_output_1d<R>(col, y);
      s[0][j] = y[0];
      s[1][j] = y[1];
    }
    const __m512 b = bias != nullptr ? _mm512_set1_ps(bias[r]) : zero;
    float* o = out + r * plane;
    for (int a = 0; a < 2; ++a) {
      __m512 y[2];
      transform_output_1d<R>(s[a], y);
      for (int c = 0; c < 2; ++c) {
        // max(0, y): vmaxps returns its second operand when one is NaN, so NaN stays NaN.
        const __m512 sum = _mm512_add_ps(y[c], b);
        const __m512 val = relu ? _mm512_max_ps(zero, sum) : sum;
        _mm512_mask_i32scatter_ps(o + a * g.w_out + c, m.out_mask[a][c], offset, val, 4);
      }
    }
  }
}

// Scratch reused across calls on each thread: V for one tile block and M for one row block.
struct Scratch {
  std::vector<float> v, m;
};

template <int R>
PYOWT_AVX512 void run_tile_block(const Geometry& g, const float* x, const float* U,
                                 const float* bias, bool relu, int64_t first_tile, float* out,
                                 Scratch& s) {
  constexpr int P = positions(R);
  const int64_t xi_stride = int64_t(g.c) * kTiles + kPad;
  const LaneMap lanes[kVecs] = {map_lanes(g, first_tile), map_lanes(g, first_tile + 16)};
  for (int v = 0; v < kVecs; ++v) transform_input<R>(x, lanes[v], g, s.v.data() + v * 16, xi_stride);
  const int row_blocks = (g.k + kRows - 1) / kRows;
  for (int kb = 0; kb < row_blocks; ++kb) {
    const float* uk = U + int64_t(kb) * P * g.c * kRows;
    for (int xi = 0; xi < P; ++xi) {
      multiply_block(uk + int64_t(xi) * g.c * kRows, s.v.data() + xi * xi_stride,
                     s.m.data() + xi * kRows * kTiles, g.c);
    }
    const int rows = std::min(kRows, g.k - kb * kRows);
    for (int v = 0; v < kVecs; ++v) {
      transform_output<R>(s.m.data() + v * 16, lanes[v], g,
                          bias != nullptr ? bias + kb * kRows : nullptr, relu, rows,
                          out + int64_t(kb) * kRows * g.h_out * g.w_out);
    }
  }
}

template <int R>
void run_winograd(const Geometry& g, const float* w_ptr, const float* x_ptr, const float* b_ptr,
                  bool relu, float* u_ptr, float* o_ptr) {
  constexpr int P = positions(R);
  const int row_blocks = (g.k + kRows - 1) / kRows;
  // Grain: enough filters per task that a task outweighs the fork.
  const int64_t kb_grain = std::max<int64_t>(1, 4096 / std::max(g.c, 1));
  at::parallel_for(0, row_blocks, kb_grain, [&](int64_t kb0, int64_t kb1) {
    transform_weights<R>(w_ptr, u_ptr, g.k, g.c, kb0, kb1);
  });
  const int64_t blocks = (g.tiles + kTiles - 1) / kTiles;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    thread_local Scratch scratch;
    const size_t v_size = size_t(P) * (size_t(g.c) * kTiles + kPad);
    if (scratch.v.size() < v_size) scratch.v.resize(v_size);
    if (scratch.m.size() < size_t(P) * kRows * kTiles) scratch.m.resize(size_t(P) * kRows * kTiles);
    for (int64_t b = b0; b < b1; ++b) {
      run_tile_block<R>(g, x_ptr, u_ptr, b_ptr, relu, b * kTiles, o_ptr, scratch);
    }
  });
}

}  // namespace

bool cpu_winograd_enabled() { return cpu_has_avx512f() && winograd_switch().load(); }

bool set_cpu_winograd_enabled(bool enabled) { return winograd_switch().exchange(enabled); }

bool winograd_conv2d_accepts(const at::Tensor& x, const at::Tensor& weight,
                             at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation, int64_t groups) {
  if (x.scalar_type() != at::kFloat || weight.scalar_type() != at::kFloat) return false;
  if (x.dim() != 4 || weight.dim() != 4 || !x.is_contiguous()) return false;
  const int64_t r = weight.size(2);
  if ((r != 3 && r != 5) || weight.size(3) != r || groups != 1) return false;
  if (stride[0] != 1 || stride[1] != 1 || dilation[0] != 1 || dilation[1] != 1) return false;
  const int64_t h_out = x.size(2) + 2 * padding[0] - (r - 1);
  const int64_t w_out = x.size(3) + 2 * padding[1] - (r - 1);
  if (h_out < 1 || w_out < 1 || x.numel() == 0 || weight.size(0) == 0) return false;
  // Lane offsets are 32-bit: each image's first element plus a patch or tile position,
  // padding included, must stay below 2^31.
  constexpr int64_t limit = std::numeric_limits<int32_t>::max();
  const int64_t padded_plane = (x.size(2) + 2 * padding[0] + 8) * (x.size(3) + 2 * padding[1] + 8);
  const int64_t in_reach = x.numel() + padded_plane;
  const int64_t out_reach = x.size(0) * weight.size(0) * (h_out + 2) * (w_out + 2);
  return in_reach < limit && out_reach < limit;
}

at::Tensor winograd_conv2d(const at::Tensor& x, const at::Tensor& weight_in,
                           const std::optional<at::Tensor>& bias_in, at::IntArrayRef padding,
                           bool relu) {
  TORCH_CHECK(cpu_winograd_enabled(), "winograd_conv2d: not available on this CPU");
  TORCH_CHECK(winograd_conv2d_accepts(x, weight_in, {1, 1}, padding, {1, 1}, 1),
              "winograd_conv2d: unsupported arguments, x ", x.sizes(), ", weight ",
              weight_in.sizes(), ", padding ", padding);
  const at::Tensor weight = weight_in.contiguous();
  at::Tensor bias;
  if (bias_in.has_value()) bias = bias_in->contiguous();
  Geometry g{};
  g.n = int(x.size(0));
  g.c = int(x.size(1));
  g.h = int(x.size(2));
  g.w = int(x.size(3));
  g.k = int(weight.size(0));
  g.r = int(weight.size(2));
  g.ph = int(padding[0]);
  g.pw = int(padding[1]);
  g.h_out = g.h + 2 * g.ph - (g.r - 1);
  g.w_out = g.w + 2 * g.pw - (g.r - 1);
  g.tiles_h = (g.h_out + 1) / 2;
  g.tiles_w = (g.w_out + 1) / 2;
  g.tiles = g.n * g.tiles_h * g.tiles_w;

  at::Tensor out = at::empty({g.n, g.k, g.h_out, g.w_out}, x.options());
  const int row_blocks = (g.k + kRows - 1) / kRows;
  at::Tensor U = at::empty({int64_t(row_blocks) * positions(g.r) * g.c * kRows}, x.options());
  const float* b_ptr = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  if (g.r == 3) {
    run_winograd<3>(g, weight.const_data_ptr<float>(), x.const_data_ptr<float>(), b_ptr, relu,
                    U.mutable_data_ptr<float>(), out.mutable_data_ptr<float>());
  } else {
    run_winograd<5>(g, weight.const_data_ptr<float>(), x.const_data_ptr<float>(), b_ptr, relu,
                    U.mutable_data_ptr<float>(), out.mutable_data_ptr<float>());
  }
  return out;
}

}  // namespace pyowt
