// Building blocks shared by the Winograd forward (conv2d_winograd.cpp) and weight
// gradient (conv2d_winograd_wgrad.cpp) of the CPU conv: tile geometry, the input
// transform B^T d B along one axis, and the register-blocked FMA microkernel.
// Only for translation units that check cpu_winograd_enabled() (AVX-512F) before use.
#pragma once

#include <immintrin.h>

#include <cstdint>

#define PYOWT_AVX512 __attribute__((target("avx512f,avx2,fma")))

namespace pyowt {
namespace winograd {

constexpr int kRows = 8;           // output channels per microkernel call (8 x 2 accumulators)
constexpr int kVecs = 2;           // tiles per microkernel call, in 16-float vectors
constexpr int kTiles = 16 * kVecs; // tiles per block
constexpr int kPad = 16;           // floats added to each xi plane of V: no 4K aliasing

// One convolution's sizes (x: n, c, h, w; weight: k, r x r; padding ph, pw) and its
// 2x2 output tiles.
struct Geometry {
  int n, c, h, w, k, r, ph, pw, h_out, w_out, tiles_h, tiles_w, tiles;
};

// Transform positions of F(2x2, r x r): (r + 1)^2.
constexpr int positions(int r) { return (r + 1) * (r + 1); }

// v = B^T d along one axis. 3x3: B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0],
// [0, 1, 0, -1]]. 5x5: B^T = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
// [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]].
template <int R>
PYOWT_AVX512 inline void transform_input_1d(const __m512* d, __m512* v) {
  if constexpr (R == 3) {
    v[0] = _mm512_sub_ps(d[0], d[2]);
    v[1] = _mm512_add_ps(d[1], d[2]);
    v[2] = _mm512_sub_ps(d[2], d[1]);
    v[3] = _mm512_sub_ps(d[1], d[3]);
  } else {
    const __m512 four = _mm512_set1_ps(4.f), five = _mm512_set1_ps(5.f), two = _mm512_set1_ps(2.f);
    const __m512 p = _mm512_fnmadd_ps(four, d[2], d[4]);  // d4 - 4 d2
    const __m512 q = _mm512_fnmadd_ps(four, d[1], d[3]);  // d3 - 4 d1
    const __m512 p2 = _mm512_sub_ps(d[4], d[2]);
    const __m512 q2 = _mm512_mul_ps(two, _mm512_sub_ps(d[3], d[1]));
    v[0] = _mm512_fmadd_ps(four, d[0], _mm512_fnmadd_ps(five, d[2], d[4]));
    v[1] = _mm512_add_ps(p, q);
    v[2] = _mm512_sub_ps(p, q);
    v[3] = _mm512_add_ps(p2, q2);
    v[4] = _mm512_sub_ps(p2, q2);
    v[5] = _mm512_fmadd_ps(four, d[1], _mm512_fnmadd_ps(five, d[3], d[5]));
  }
}

// M[r][col] (+)= sum_c U[c][r] * V[c][col] for kRows rows and kTiles columns, in registers
// (c runs over `depth` steps; `accumulate` adds to M instead of overwriting it).
PYOWT_AVX512 inline void multiply_block(const float* __restrict U, const float* __restrict V,
                                        float* __restrict M, int depth, bool accumulate = false) {
  __m512 acc[kRows][kVecs];
  for (int r = 0; r < kRows; ++r) {
    for (int v = 0; v < kVecs; ++v) acc[r][v] = _mm512_setzero_ps();
  }
  for (int c = 0; c < depth; ++c) {
    __m512 vv[kVecs];
    for (int v = 0; v < kVecs; ++v) vv[v] = _mm512_loadu_ps(V + int64_t(c) * kTiles + v * 16);
    const float* u = U + int64_t(c) * kRows;
    for (int r = 0; r < kRows; ++r) {
      const __m512 b = _mm512_set1_ps(u[r]);
      for (int v = 0; v < kVecs; ++v) acc[r][v] = _mm512_fmadd_ps(b, vv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int v = 0; v < kVecs; ++v) {
      float* m = M + r * kTiles + v * 16;
      _mm512_storeu_ps(m, accumulate ? _mm512_add_ps(_mm512_loadu_ps(m), acc[r][v]) : acc[r][v]);
    }
  }
}

}  // namespace winograd
}  // namespace pyowt
