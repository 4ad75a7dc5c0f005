// Winograd F(2x2, 3x3) convolution forward on AVX-512, NCHW float32.
//
// Why: on the 2-core EPYC (Zen 4) oneDNN's direct convolution already runs AlexNet's and
// ResNet's 3x3 layers at the FMA units' peak (~230 GFLOP/s), so fusing the ReLU alone saves
// only its pass over the output. F(2x2, 3x3) does 2.25x fewer multiplies (16 per 2x2
// output tile instead of 36). An earlier try that ran the 16 GEMMs through at::bmm between
// whole-tensor transform passes lost to oneDNN (transforms memory-bound, GEMMs at ~130
// GFLOP/s); this one is blocked so that every transform works on cache-resident data:
//
//   per block of kTiles output tiles (any images, any rows):
//     input transform: V[xi][c][tile] = (B^T d B)[xi] for the block's 4x4 input patches,
//       16 tiles per AVX-512 vector (masked gathers read the patches, zero padding comes
//       from the masks);                                           -> V in L2
//     for each block of kRows output channels:
//       for each of the 16 transform positions xi:
//         M[xi] = U[xi][rows][c] . V[xi][c][tiles]  (register-blocked microkernel)
//       output transform: out = A^T M A + bias, ReLU, masked scatters into NCHW.  (L1)
//
// U (the transformed weights, laid out [row block][xi][c][row]) is computed once per
// call and streamed in order. Accuracy: relative error 2-3e-7 against float64 on the
// AlexNet layers, about twice the direct convolution's. A NaN or infinity in the input
// reaches every output of the 2x2 tiles whose 4x4 patch holds it (the transforms mix the
// patch), a superset of the direct convolution's NaN outputs; infinities can become NaN.
#include "conv2d_winograd.h"

#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#define PYOWT_AVX512 __attribute__((target("avx512f,avx2,fma")))

namespace pyowt {
namespace {

constexpr int kRows = 8;           // output channels per microkernel call (8 x 2 accumulators)
constexpr int kVecs = 2;           // tiles per microkernel call, in 16-float vectors
constexpr int kTiles = 16 * kVecs; // tiles per block
constexpr int kPad = 16;           // floats added to each xi plane of V: no 4K aliasing

struct Geometry {
  int n, c, h, w, k, ph, pw, h_out, w_out, tiles_h, tiles_w, tiles;
};

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

// U[kb][xi][c][r] = (G g G^T)[xi] for the filter g = weight[kb * kRows + r][c], zero
// for rows past C_out. G = [[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]].
PYOWT_AVX512 void transform_weights(const float* w, float* U, int k_out, int c_in, int64_t kb0,
                                    int64_t kb1) {
  const __m256 half = _mm256_set1_ps(0.5f);
  const __m256i rows = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                          _mm256_set1_epi32(c_in * 9));
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    const int valid = std::min<int64_t>(kRows, k_out - kb * kRows);
    const __m256 mask = _mm256_castsi256_ps(
        _mm256_cmpgt_epi32(_mm256_set1_epi32(valid), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
    const float* wk = w + kb * kRows * int64_t(c_in) * 9;
    float* uk = U + kb * 16 * int64_t(c_in) * kRows;
    for (int c = 0; c < c_in; ++c) {
      __m256 g[9];
      for (int e = 0; e < 9; ++e) {
        g[e] = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), wk + c * 9 + e, rows, mask, 4);
      }
      __m256 t[4][3];  // G g: rows of the 4x3 intermediate
      for (int j = 0; j < 3; ++j) {
        const __m256 g0 = g[j], g1 = g[3 + j], g2 = g[6 + j];
        t[0][j] = g0;
        t[1][j] = _mm256_mul_ps(half, _mm256_add_ps(_mm256_add_ps(g0, g1), g2));
        t[2][j] = _mm256_mul_ps(half, _mm256_add_ps(_mm256_sub_ps(g0, g1), g2));
        t[3][j] = g2;
      }
      for (int i = 0; i < 4; ++i) {
        const __m256 u[4] = {
            t[i][0], _mm256_mul_ps(half, _mm256_add_ps(_mm256_add_ps(t[i][0], t[i][1]), t[i][2])),
            _mm256_mul_ps(half, _mm256_add_ps(_mm256_sub_ps(t[i][0], t[i][1]), t[i][2])), t[i][2]};
        for (int j = 0; j < 4; ++j) {
          _mm256_storeu_ps(uk + (int64_t(i * 4 + j) * c_in + c) * kRows, u[j]);
        }
      }
    }
  }
}

// Per-lane placement of 16 consecutive tiles: offsets of their input patches and output
// tiles, and which rows/columns of each exist (lanes past the last tile have no bits).
struct LaneMap {
  alignas(64) int32_t in_offset[16];
  alignas(64) int32_t out_offset[16];
  __mmask16 in_row[4] = {0, 0, 0, 0}, in_col[4] = {0, 0, 0, 0};
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
    for (int i = 0; i < 4; ++i) {
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

// V[xi][c][0..15] = (B^T d B)[xi] for the 16 tiles of `m`, d the 4x4 input patch of
// channel c. B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]].
PYOWT_AVX512 void transform_input(const float* x, const LaneMap& m, const Geometry& g, float* V,
                                  int64_t xi_stride) {
  const __m512i base = _mm512_load_si512(m.in_offset);
  __mmask16 mask[4][4];
  for (int i = 0; i < 4; ++i) {
    for (int j = 0; j < 4; ++j) mask[i][j] = m.in_row[i] & m.in_col[j];
  }
  const __m512 zero = _mm512_setzero_ps();
  const int64_t plane = int64_t(g.h) * g.w;
  for (int c = 0; c < g.c; ++c) {
    const float* xc = x + c * plane;
    __m512 d[4][4];
    for (int i = 0; i < 4; ++i) {
      for (int j = 0; j < 4; ++j) {
        d[i][j] = _mm512_mask_i32gather_ps(zero, mask[i][j], base, xc + i * g.w + j, 4);
      }
    }
    __m512 t[4][4];  // B^T d
    for (int j = 0; j < 4; ++j) {
      t[0][j] = _mm512_sub_ps(d[0][j], d[2][j]);
      t[1][j] = _mm512_add_ps(d[1][j], d[2][j]);
      t[2][j] = _mm512_sub_ps(d[2][j], d[1][j]);
      t[3][j] = _mm512_sub_ps(d[1][j], d[3][j]);
    }
    float* vc = V + int64_t(c) * kTiles;
    for (int i = 0; i < 4; ++i) {
      _mm512_storeu_ps(vc + (i * 4 + 0) * xi_stride, _mm512_sub_ps(t[i][0], t[i][2]));
      _mm512_storeu_ps(vc + (i * 4 + 1) * xi_stride, _mm512_add_ps(t[i][1], t[i][2]));
      _mm512_storeu_ps(vc + (i * 4 + 2) * xi_stride, _mm512_sub_ps(t[i][2], t[i][1]));
      _mm512_storeu_ps(vc + (i * 4 + 3) * xi_stride, _mm512_sub_ps(t[i][1], t[i][3]));
    }
  }
}

// M[r][tile] = sum_c U[c][r] * V[c][tile] for kRows rows and kTiles tiles, in registers.
PYOWT_AVX512 void multiply_block(const float* __restrict U, const float* __restrict V,
                                 float* __restrict M, int c_in) {
  __m512 acc[kRows][kVecs];
  for (int r = 0; r < kRows; ++r) {
    for (int v = 0; v < kVecs; ++v) acc[r][v] = _mm512_setzero_ps();
  }
  for (int c = 0; c < c_in; ++c) {
    __m512 vv[kVecs];
    for (int v = 0; v < kVecs; ++v) vv[v] = _mm512_loadu_ps(V + int64_t(c) * kTiles + v * 16);
    const float* u = U + int64_t(c) * kRows;
    for (int r = 0; r < kRows; ++r) {
      const __m512 b = _mm512_set1_ps(u[r]);
      for (int v = 0; v < kVecs; ++v) acc[r][v] = _mm512_fmadd_ps(b, vv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int v = 0; v < kVecs; ++v) _mm512_storeu_ps(M + r * kTiles + v * 16, acc[r][v]);
  }
}

// out tile = A^T M A (+ bias, ReLU) for `rows` channels and the 16 tiles of `m`, M laid
// out [xi][row][tile] (xi stride kRows * kTiles). A^T = [[1, 1, 1, 0], [0, 1, -1, -1]].
PYOWT_AVX512 void transform_output(const float* M, const LaneMap& m, const Geometry& g,
                                   const float* bias, bool relu, int rows, float* out) {
  const __m512i offset = _mm512_load_si512(m.out_offset);
  const __m512 zero = _mm512_setzero_ps();
  const int64_t plane = int64_t(g.h_out) * g.w_out;
  for (int r = 0; r < rows; ++r) {
    __m512 v[16];
    for (int xi = 0; xi < 16; ++xi) v[xi] = _mm512_loadu_ps(M + xi * kRows * kTiles + r * kTiles);
    __m512 s0[4], s1[4];  // A^T M
    for (int j = 0; j < 4; ++j) {
      s0[j] = _mm512_add_ps(_mm512_add_ps(v[j], v[4 + j]), v[8 + j]);
      s1[j] = _mm512_sub_ps(_mm512_sub_ps(v[4 + j], v[8 + j]), v[12 + j]);
    }
    const __m512 b = bias != nullptr ? _mm512_set1_ps(bias[r]) : zero;
    __m512 y[2][2] = {
        {_mm512_add_ps(_mm512_add_ps(_mm512_add_ps(s0[0], s0[1]), s0[2]), b),
         _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(s0[1], s0[2]), s0[3]), b)},
        {_mm512_add_ps(_mm512_add_ps(_mm512_add_ps(s1[0], s1[1]), s1[2]), b),
         _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(s1[1], s1[2]), s1[3]), b)}};
    float* o = out + r * plane;
    for (int a = 0; a < 2; ++a) {
      for (int c = 0; c < 2; ++c) {
        // max(0, y): vmaxps returns its second operand when one is NaN, so NaN stays NaN.
        const __m512 val = relu ? _mm512_max_ps(zero, y[a][c]) : y[a][c];
        _mm512_mask_i32scatter_ps(o + a * g.w_out + c, m.out_mask[a][c], offset, val, 4);
      }
    }
  }
}

// Scratch reused across calls on each thread: V for one tile block and M for one row block.
struct Scratch {
  std::vector<float> v, m;
};

PYOWT_AVX512 void run_tile_block(const Geometry& g, const float* x, const float* U,
                                 const float* bias, bool relu, int64_t first_tile, float* out,
                                 Scratch& s) {
  const int64_t xi_stride = int64_t(g.c) * kTiles + kPad;
  const LaneMap lanes[kVecs] = {map_lanes(g, first_tile), map_lanes(g, first_tile + 16)};
  for (int v = 0; v < kVecs; ++v) transform_input(x, lanes[v], g, s.v.data() + v * 16, xi_stride);
  const int row_blocks = (g.k + kRows - 1) / kRows;
  for (int kb = 0; kb < row_blocks; ++kb) {
    const float* uk = U + int64_t(kb) * 16 * g.c * kRows;
    for (int xi = 0; xi < 16; ++xi) {
      multiply_block(uk + int64_t(xi) * g.c * kRows, s.v.data() + xi * xi_stride,
                     s.m.data() + xi * kRows * kTiles, g.c);
    }
    const int rows = std::min(kRows, g.k - kb * kRows);
    for (int v = 0; v < kVecs; ++v) {
      transform_output(s.m.data() + v * 16, lanes[v], g, bias != nullptr ? bias + kb * kRows : nullptr,
                       relu, rows, out + int64_t(kb) * kRows * g.h_out * g.w_out);
    }
  }
}

}  // namespace

bool cpu_winograd_enabled() { return cpu_has_avx512f() && winograd_switch().load(); }

bool set_cpu_winograd_enabled(bool enabled) { return winograd_switch().exchange(enabled); }

int64_t winograd_tile_block() { return kTiles; }

bool winograd_conv2d_3x3_accepts(const at::Tensor& x, const at::Tensor& weight,
                                 at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation, int64_t groups) {
  if (x.scalar_type() != at::kFloat || weight.scalar_type() != at::kFloat) return false;
  if (x.dim() != 4 || weight.dim() != 4 || !x.is_contiguous()) return false;
  if (weight.size(2) != 3 || weight.size(3) != 3 || groups != 1) return false;
  if (stride[0] != 1 || stride[1] != 1 || dilation[0] != 1 || dilation[1] != 1) return false;
  const int64_t h_out = x.size(2) + 2 * padding[0] - 2, w_out = x.size(3) + 2 * padding[1] - 2;
  if (h_out < 1 || w_out < 1 || x.numel() == 0 || weight.size(0) == 0) return false;
  // Lane offsets are 32-bit: each image's first element plus a patch or tile position,
  // padding included, must stay below 2^31.
  constexpr int64_t limit = std::numeric_limits<int32_t>::max();
  const int64_t padded_plane = (x.size(2) + 2 * padding[0] + 4) * (x.size(3) + 2 * padding[1] + 4);
  const int64_t in_reach = x.numel() + padded_plane;
  const int64_t out_reach = x.size(0) * weight.size(0) * (h_out + 2) * (w_out + 2);
  return in_reach < limit && out_reach < limit;
}

at::Tensor winograd_conv2d_3x3(const at::Tensor& x, const at::Tensor& weight_in,
                               const std::optional<at::Tensor>& bias_in, at::IntArrayRef padding,
                               bool relu) {
  TORCH_CHECK(cpu_winograd_enabled(), "winograd_conv2d_3x3: not available on this CPU");
  TORCH_CHECK(winograd_conv2d_3x3_accepts(x, weight_in, {1, 1}, padding, {1, 1}, 1),
              "winograd_conv2d_3x3: unsupported arguments, x ", x.sizes(), ", weight ",
              weight_in.sizes());
  const at::Tensor weight = weight_in.contiguous();
  at::Tensor bias;
  if (bias_in.has_value()) bias = bias_in->contiguous();
  Geometry g{};
  g.n = int(x.size(0));
  g.c = int(x.size(1));
  g.h = int(x.size(2));
  g.w = int(x.size(3));
  g.k = int(weight.size(0));
  g.ph = int(padding[0]);
  g.pw = int(padding[1]);
  g.h_out = g.h + 2 * g.ph - 2;
  g.w_out = g.w + 2 * g.pw - 2;
  g.tiles_h = (g.h_out + 1) / 2;
  g.tiles_w = (g.w_out + 1) / 2;
  g.tiles = g.n * g.tiles_h * g.tiles_w;

  at::Tensor out = at::empty({g.n, g.k, g.h_out, g.w_out}, x.options());
  const int row_blocks = (g.k + kRows - 1) / kRows;
  at::Tensor U = at::empty({int64_t(row_blocks) * 16 * g.c * kRows}, x.options());
  const float* w_ptr = weight.const_data_ptr<float>();
  float* u_ptr = U.mutable_data_ptr<float>();
  // Grain: enough filters per task that a task outweighs the fork.
  const int64_t kb_grain = std::max<int64_t>(1, 4096 / std::max(g.c, 1));
  at::parallel_for(0, row_blocks, kb_grain, [&](int64_t kb0, int64_t kb1) {
    transform_weights(w_ptr, u_ptr, g.k, g.c, kb0, kb1);
  });

  const float* x_ptr = x.const_data_ptr<float>();
  const float* b_ptr = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  float* o_ptr = out.mutable_data_ptr<float>();
  const int64_t blocks = (g.tiles + kTiles - 1) / kTiles;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    thread_local Scratch scratch;
    const size_t v_size = size_t(16) * (size_t(g.c) * kTiles + kPad);
    if (scratch.v.size() < v_size) scratch.v.resize(v_size);
    if (scratch.m.size() < size_t(16) * kRows * kTiles) scratch.m.resize(size_t(16) * kRows * kTiles);
    for (int64_t b = b0; b < b1; ++b) {
      run_tile_block(g, x_ptr, u_ptr, b_ptr, relu, b * kTiles, o_ptr, scratch);
    }
  });
  return out;
}

}  // namespace pyowt
