// Weight gradient of a stride-1 3x3 / 5x5 convolution by Winograd F(r x r, 2 x 2), AVX-512.
//
// grad_w[k][c][u][v] = sum over images and outputs (oy, ox) of
//   grad_out[n][k][oy][ox] * x[n][c][oy - ph + u][ox - pw + v].
// Split the outputs into the forward's 2x2 tiles: each tile adds a correlation of its 2x2
// grad_out block with its (r+1) x (r+1) input patch, an F(r, 2) problem in each axis with
// the same interpolation points, so the same B^T as the forward:
//   grad_w[k][c] = A'^T [ sum_t (G' go_t[k] G'^T) . (B^T d_t[c] B) ] A'
// (elementwise product, summed over tiles t). Three passes:
//   per chunk of tiles (sized so that its V and GO stay in L3, whatever the batch):
//   1. per tile: V[xi][c][t] = B^T d B (16 channels per vector, gathered across channel
//      planes) and GO[xi][k][t] = G' go G'^T (8 channels per vector);
//   2. per transform position xi: M[xi][k][c] += sum_t GO[xi][k][t] V[xi][c][t], the
//      forward's 8 x 32 microkernel with t as its depth, 256 tiles per call so that a
//      32-channel slice of V stays in L1;
//   then once:
//   3. per k: grad_w[k][c] = A'^T M[.][k][c] A'.
// Same multiply saving as the forward (2.25x for 3x3, 2.78x for 5x5, less the wasted
// parts of odd-sized outputs' last tiles).
#include "conv2d_winograd.h"
#include "winograd_kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace pyowt {
namespace {

using namespace winograd;

constexpr int kChannelBlock = 32;  // V's channel slices: the microkernel's columns
constexpr int kDepthChunk = 256;   // tiles per microkernel call (32 KB slice of V in L1)

// G' (alpha x 2) and A'^T (r x alpha) of F(r, 2), matched to the forward's B^T (rows of
// G' for the points 0, 1, -1 (, 2, -2), then infinity).
constexpr float kGw3[4][2] = {{1.f, 0.f}, {.5f, .5f}, {.5f, -.5f}, {0.f, -1.f}};
constexpr float kAw3[3][4] = {{1.f, 1.f, 1.f, 0.f}, {0.f, 1.f, -1.f, 0.f}, {0.f, 1.f, 1.f, 1.f}};
constexpr float kGw5[6][2] = {{1.f / 4, 0.f},         {-1.f / 6, -1.f / 6}, {-1.f / 6, 1.f / 6},
                              {1.f / 24, 1.f / 12},   {1.f / 24, -1.f / 12}, {0.f, 1.f}};
constexpr float kAw5[5][6] = {{1.f, 1.f, 1.f, 1.f, 1.f, 0.f},
                              {0.f, 1.f, -1.f, 2.f, -2.f, 0.f},
                              {0.f, 1.f, 1.f, 4.f, 4.f, 0.f},
                              {0.f, 1.f, -1.f, 8.f, -8.f, 0.f},
                              {0.f, 1.f, 1.f, 16.f, 16.f, 1.f}};

template <int R>
constexpr float gw(int i, int j) {
  if constexpr (R == 3) {
    return kGw3[i][j];
  } else {
    return kGw5[i][j];
  }
}

template <int R>
constexpr float aw(int i, int j) {
  if constexpr (R == 3) {
    return kAw3[i][j];
  } else {
    return kAw5[i][j];
  }
}

struct Sizes {
  Geometry g;
  int c_blocks, k_blocks;  // channel slices of 32, output-channel blocks of 8
};

// Pass 1 for tiles [t0, t1) of the chunk that starts at tile `first` and holds `T`
// tiles: V[xi][cb][t - first][32] and GO[xi][kb][t - first][8].
template <int R>
PYOWT_AVX512 void transform_tiles(const Sizes& s, const float* x, const float* go, float* V,
                                  float* GO, int64_t first, int64_t T, int64_t t0, int64_t t1) {
  constexpr int A = R + 1;
  const Geometry& g = s.g;
  const int64_t plane = int64_t(g.h) * g.w, out_plane = int64_t(g.h_out) * g.w_out;
  const __m512i lanes16 = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(int(plane)));
  const __m256i lanes8 = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                            _mm256_set1_epi32(int(out_plane)));
  const __m512 zero = _mm512_setzero_ps();
  const int per_image = g.tiles_h * g.tiles_w;
  for (int64_t t = t0; t < t1; ++t) {
    const int n = int(t / per_image), rem = int(t % per_image);
    const int th = rem / g.tiles_w, tw = rem % g.tiles_w;
    const int y0 = 2 * th - g.ph, x0 = 2 * tw - g.pw, oy = 2 * th, ox = 2 * tw;
    // Input patches, 16 channels per vector.
    for (int c0 = 0; c0 < s.c_blocks * kChannelBlock; c0 += 16) {
      const int valid = std::max(0, std::min(16, g.c - c0));
      const __mmask16 ch = __mmask16((1u << valid) - 1u);
      const float* xc = x + (int64_t(n) * g.c + c0) * plane;
      __m512 rows[A][A];
      for (int i = 0; i < A; ++i) {
        __m512 d[A];
        const bool row_in = y0 + i >= 0 && y0 + i < g.h;
        for (int j = 0; j < A; ++j) {
          const bool in = row_in && x0 + j >= 0 && x0 + j < g.w && valid > 0;
          d[j] = in ? _mm512_mask_i32gather_ps(zero, ch, lanes16,
                                               xc + int64_t(y0 + i) * g.w + (x0 + j), 4)
                    : zero;
        }
        transform_input_1d<R>(d, rows[i]);
      }
      const int cb = c0 / kChannelBlock, half = c0 % kChannelBlock;
      for (int j = 0; j < A; ++j) {
        __m512 col[A], v[A];
        for (int i = 0; i < A; ++i) col[i] = rows[i][j];
        transform_input_1d<R>(col, v);
        for (int i = 0; i < A; ++i) {
          float* dst =
              V + ((int64_t(i * A + j) * s.c_blocks + cb) * T + (t - first)) * kChannelBlock + half;
          _mm512_storeu_ps(dst, v[i]);
        }
      }
    }
    // grad_out tiles, 8 channels per vector.
    for (int kb = 0; kb < s.k_blocks; ++kb) {
      const int valid = std::min(kRows, g.k - kb * kRows);
      const __m256 ch = _mm256_castsi256_ps(
          _mm256_cmpgt_epi32(_mm256_set1_epi32(valid), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
      const float* gk = go + (int64_t(n) * g.k + kb * kRows) * out_plane;
      __m256 o[2][2];
      for (int a = 0; a < 2; ++a) {
        for (int b = 0; b < 2; ++b) {
          const bool in = oy + a < g.h_out && ox + b < g.w_out;
          o[a][b] = in ? _mm256_mask_i32gather_ps(_mm256_setzero_ps(),
                                                  gk + int64_t(oy + a) * g.w_out + (ox + b), lanes8, ch, 4)
                       : _mm256_setzero_ps();
        }
      }
      __m256 t2[A][2];  // G' go
      for (int i = 0; i < A; ++i) {
        for (int b = 0; b < 2; ++b) {
          t2[i][b] = _mm256_fmadd_ps(_mm256_set1_ps(gw<R>(i, 0)), o[0][b],
                                     _mm256_mul_ps(_mm256_set1_ps(gw<R>(i, 1)), o[1][b]));
        }
      }
      for (int i = 0; i < A; ++i) {
        for (int j = 0; j < A; ++j) {  // (G' go) G'^T
          const __m256 u = _mm256_fmadd_ps(_mm256_set1_ps(gw<R>(j, 0)), t2[i][0],
                                           _mm256_mul_ps(_mm256_set1_ps(gw<R>(j, 1)), t2[i][1]));
          _mm256_storeu_ps(GO + ((int64_t(i * A + j) * s.k_blocks + kb) * T + (t - first)) * kRows, u);
        }
      }
    }
  }
}

// Pass 2 for position xi: M[xi][kb][cb][8][32] (+)= sum over the chunk's T tiles.
PYOWT_AVX512 void multiply_position(const Sizes& s, const float* V, const float* GO, float* M,
                                    int xi, int64_t T, bool accumulate) {
  constexpr int block = kRows * kChannelBlock;
  float* m_xi = M + int64_t(xi) * s.k_blocks * s.c_blocks * block;
  for (int64_t t0 = 0; t0 < T; t0 += kDepthChunk) {
    const int depth = int(std::min<int64_t>(kDepthChunk, T - t0));
    for (int cb = 0; cb < s.c_blocks; ++cb) {
      const float* v = V + ((int64_t(xi) * s.c_blocks + cb) * T + t0) * kChannelBlock;
      for (int kb = 0; kb < s.k_blocks; ++kb) {
        const float* u = GO + ((int64_t(xi) * s.k_blocks + kb) * T + t0) * kRows;
        multiply_block(u, v, m_xi + (int64_t(kb) * s.c_blocks + cb) * block, depth,
                       accumulate || t0 > 0);
      }
    }
  }
}

// Pass 3 for output channels [k0, k1): grad_w[k][c] = A'^T M A', 16 channels per vector.
template <int R>
PYOWT_AVX512 void transform_weight_grads(const Sizes& s, const float* M, float* gw_out,
                                         int64_t k0, int64_t k1) {
  constexpr int A = R + 1;
  constexpr int block = kRows * kChannelBlock;
  const int64_t xi_stride = int64_t(s.k_blocks) * s.c_blocks * block;
  const __m512i lanes = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(R * R));
  for (int64_t k = k0; k < k1; ++k) {
    const int kb = int(k / kRows), row = int(k % kRows);
    for (int c0 = 0; c0 < s.g.c; c0 += 16) {
      const int valid = std::min(16, s.g.c - c0);
      const __mmask16 ch = __mmask16((1u << valid) - 1u);
      const int cb = c0 / kChannelBlock, half = c0 % kChannelBlock;
      const float* m = M + (int64_t(kb) * s.c_blocks + cb) * block + row * kChannelBlock + half;
      __m512 half_done[R][A];  // A'^T M along the first axis
      for (int j = 0; j < A; ++j) {
        __m512 col[A];
        for (int i = 0; i < A; ++i) col[i] = _mm512_loadu_ps(m + (i * A + j) * xi_stride);
        for (int u = 0; u < R; ++u) {
          __m512 acc = _mm512_setzero_ps();
          for (int i = 0; i < A; ++i) {
            if (aw<R>(u, i) != 0.f) acc = _mm512_fmadd_ps(_mm512_set1_ps(aw<R>(u, i)), col[i], acc);
          }
          half_done[u][j] = acc;
        }
      }
      float* dst = gw_out + (k * s.g.c + c0) * R * R;
      for (int u = 0; u < R; ++u) {
        for (int v = 0; v < R; ++v) {
          __m512 acc = _mm512_setzero_ps();
          for (int j = 0; j < A; ++j) {
            if (aw<R>(v, j) != 0.f) acc = _mm512_fmadd_ps(_mm512_set1_ps(aw<R>(v, j)), half_done[u][j], acc);
          }
          _mm512_mask_i32scatter_ps(dst + u * R + v, ch, lanes, acc, 4);
        }
      }
    }
  }
}

// Tiles per chunk: V and GO of one chunk take about this many bytes (L3-resident), so
// neither grows with the batch; M accumulates over the chunks.
constexpr int64_t kChunkBytes = int64_t(8) << 20;

template <int R>
void run_weight_grad(const Sizes& s, const float* x, const float* go, float* gw_out) {
  constexpr int P = positions(R);
  const int64_t per_tile = int64_t(P) * (s.c_blocks * kChannelBlock + s.k_blocks * kRows) * 4;
  const int64_t chunk = std::min<int64_t>(s.g.tiles, std::max<int64_t>(64, kChunkBytes / per_tile));
  at::Tensor V = at::empty({int64_t(P) * s.c_blocks * chunk * kChannelBlock}, at::kFloat);
  at::Tensor GO = at::empty({int64_t(P) * s.k_blocks * chunk * kRows}, at::kFloat);
  at::Tensor M = at::empty({int64_t(P) * s.k_blocks * s.c_blocks * kRows * kChannelBlock}, at::kFloat);
  float* v = V.mutable_data_ptr<float>();
  float* o = GO.mutable_data_ptr<float>();
  float* m = M.mutable_data_ptr<float>();
  for (int64_t first = 0; first < s.g.tiles; first += chunk) {
    const int64_t count = std::min(chunk, s.g.tiles - first);
    at::parallel_for(first, first + count, 16, [&](int64_t t0, int64_t t1) {
      transform_tiles<R>(s, x, go, v, o, first, count, t0, t1);
    });
    at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t xi = p0; xi < p1; ++xi) multiply_position(s, v, o, m, int(xi), count, first > 0);
    });
  }
  at::parallel_for(0, s.g.k, 8, [&](int64_t k0, int64_t k1) {
    transform_weight_grads<R>(s, m, gw_out, k0, k1);
  });
}

}  // namespace

at::Tensor winograd_conv2d_weight_grad(const at::Tensor& x, const at::Tensor& grad_out,
                                       int64_t r, at::IntArrayRef padding) {
  TORCH_CHECK(cpu_winograd_enabled(), "winograd_conv2d_weight_grad: not available on this CPU");
  TORCH_CHECK(r == 3 || r == 5, "winograd_conv2d_weight_grad: kernel size must be 3 or 5, got ", r);
  const at::Tensor weight_shape = at::empty({grad_out.size(1), x.size(1), r, r},
                                            x.options().device(at::kMeta));
  TORCH_CHECK(winograd_conv2d_accepts(x, weight_shape, {1, 1}, padding, {1, 1}, 1),
              "winograd_conv2d_weight_grad: unsupported arguments, x ", x.sizes(), ", r ", r,
              ", padding ", padding);
  Sizes s{};
  Geometry& g = s.g;
  g.n = int(x.size(0));
  g.c = int(x.size(1));
  g.h = int(x.size(2));
  g.w = int(x.size(3));
  g.k = int(grad_out.size(1));
  g.r = int(r);
  g.ph = int(padding[0]);
  g.pw = int(padding[1]);
  g.h_out = g.h + 2 * g.ph - (g.r - 1);
  g.w_out = g.w + 2 * g.pw - (g.r - 1);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == g.n && grad_out.size(2) == g.h_out &&
                  grad_out.size(3) == g.w_out && grad_out.is_contiguous() &&
                  grad_out.scalar_type() == at::kFloat,
              "winograd_conv2d_weight_grad: grad_out must be a contiguous float32 (", g.n, ", C_out, ",
              g.h_out, ", ", g.w_out, ") tensor, got ", grad_out.sizes());
  g.tiles_h = (g.h_out + 1) / 2;
  g.tiles_w = (g.w_out + 1) / 2;
  g.tiles = g.n * g.tiles_h * g.tiles_w;
  s.c_blocks = (g.c + kChannelBlock - 1) / kChannelBlock;
  s.k_blocks = (g.k + kRows - 1) / kRows;
  at::Tensor grad_w = at::empty({g.k, g.c, r, r}, x.options());
  const float* xp = x.const_data_ptr<float>();
  const float* gp = grad_out.const_data_ptr<float>();
  if (r == 3) {
    run_weight_grad<3>(s, xp, gp, grad_w.mutable_data_ptr<float>());
  } else {
    run_weight_grad<5>(s, xp, gp, grad_w.mutable_data_ptr<float>());
  }
  return grad_w;
}

}  // namespace pyowt
