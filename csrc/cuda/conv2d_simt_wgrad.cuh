// fp32 weight gradient of conv2d on CUDA cores (plain FMA: no TF32, full fp32 accuracy
// whatever torch's TF32 flags say):
//   grad_w[co, k] = sum over m of G[m, co] * A[m, k]
// with A the forward's implicit im2col of x (conv2d_common.cuh: m = (n, oh, ow),
// k = (r, s, c)) and G = grad_pre as an NHWC (M, C_out) matrix. grad_w comes out as a
// (C_out, K) matrix, i.e. the weight in (C_out, R, S, C_in) order.
//
// The reduction runs over M = N * H_out * W_out, large next to the C_out x K result, so
// blockIdx.z splits M into slices of m_per_split rows: slice z writes its partial tile to
// gw + z * C_out * K and the host sums the slices in a fixed order (deterministic, no
// atomics). One block of 256 threads computes a 64 (co) x 64 (k) tile (kWgradBCo x
// kWgradBK) of its slice, kWgradRows = 16 rows of M per step; thread (tm, tn) =
// (tid / 16, tid % 16) owns the 4 x 4 register block co tm*4..+3, k tn*4..+3. Loads: thread
// tid fetches row tid / 16 of the step and the four consecutive columns (tid % 16) * 4..+3
// of both A and G. Its k columns are the same for the whole block, so their (r, s, c) are
// decoded once; each step decodes one row.
#pragma once

#include "conv2d_common.cuh"

namespace pyowt {
namespace conv2d_cuda {
namespace simt {

constexpr int kWgradBCo = 64;
constexpr int kWgradBK = 64;
constexpr int kWgradRows = 16;
constexpr int kWgradThreads = 256;
// [row][column] shared tiles; +4 keeps float4 alignment and skews rows across banks.
constexpr int kWgradLd = 64 + 4;

static_assert(kWgradRows * kWgradBK / 4 == kWgradThreads, "four A columns of one row per thread");
static_assert(kWgradRows * kWgradBCo / 4 == kWgradThreads, "four G columns of one row per thread");
static_assert((kWgradBCo / 4) * (kWgradBK / 4) == kWgradThreads, "one 4x4 block per thread");

// x: NHWC fp32 input; g: NHWC fp32 grad_pre (M, C_out); gw: split-major partial results,
// gridDim.z slices of (C_out, K).
__global__ void __launch_bounds__(kWgradThreads)
    conv2d_wgrad_simt_kernel(const ConvParams p, const float* __restrict__ x, const float* __restrict__ g,
                             float* __restrict__ gw, int m_per_split) {
  __shared__ __align__(16) float Gs[kWgradRows][kWgradLd];  // [m][co]
  __shared__ __align__(16) float As[kWgradRows][kWgradLd];  // [m][k]

  const int tid = threadIdx.x;
  const int k_block = blockIdx.x * kWgradBK;
  const int co_block = blockIdx.y * kWgradBCo;
  const int m_begin = blockIdx.z * m_per_split;
  const int m_end = min(p.M, m_begin + m_per_split);
  const int num_steps = m_end > m_begin ? (m_end - m_begin + kWgradRows - 1) / kWgradRows : 0;

  const int ld_row = tid / 16;
  const int ld_col = (tid % 16) * 4;
  int kr[4], ks[4], kc[4];
  bool k_ok[4], co_ok[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int k = k_block + ld_col + j;
    k_ok[j] = k < p.K;
    decode_k(p, k_ok[j] ? k : 0, kr[j], ks[j], kc[j]);
    co_ok[j] = co_block + ld_col + j < p.Cout;
  }

  float a_reg[4];
  float g_reg[4];
  auto load_regs = [&](int step) {
    const int m = m_begin + step * kWgradRows + ld_row;
    // Rows past the slice (not only past M) are zero: the next slice owns them.
    const RowInfo ri = decode_row(p, m < m_end ? m : p.M);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      int off;
      const bool ok = a_offset(p, ri, kr[j], ks[j], kc[j], off) && k_ok[j];
      a_reg[j] = ok ? x[off] : 0.f;
      g_reg[j] = ri.ok && co_ok[j] ? g[m * p.Cout + co_block + ld_col + j] : 0.f;
    }
  };

  const int tm = tid / (kWgradBK / 4);
  const int tn = tid % (kWgradBK / 4);
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
  }

  if (num_steps > 0) load_regs(0);
  for (int step = 0; step < num_steps; ++step) {
    // The previous iteration's closing barrier guarantees nobody still reads As/Gs.
    *reinterpret_cast<float4*>(&As[ld_row][ld_col]) = make_float4(a_reg[0], a_reg[1], a_reg[2], a_reg[3]);
    *reinterpret_cast<float4*>(&Gs[ld_row][ld_col]) = make_float4(g_reg[0], g_reg[1], g_reg[2], g_reg[3]);
    __syncthreads();
    if (step + 1 < num_steps) load_regs(step + 1);  // in flight during the FMAs below
#pragma unroll
    for (int kk = 0; kk < kWgradRows; ++kk) {
      const float4 gv = *reinterpret_cast<const float4*>(&Gs[kk][tm * 4]);
      const float4 av = *reinterpret_cast<const float4*>(&As[kk][tn * 4]);
      const float gi[4] = {gv.x, gv.y, gv.z, gv.w};
      const float aj[4] = {av.x, av.y, av.z, av.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(gi[i], aj[j], acc[i][j]);
      }
    }
    __syncthreads();
  }

  // Every in-range element of the tile is written, zero for an empty slice, so the host
  // needs no zero-filled workspace.
  float* const dst = gw + blockIdx.z * (p.Cout * p.K);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int co = co_block + tm * 4 + i;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int k = k_block + tn * 4 + j;
      if (co < p.Cout && k < p.K) dst[co * p.K + k] = acc[i][j];
    }
  }
}

}  // namespace simt
}  // namespace conv2d_cuda
}  // namespace pyowt
