// fp32 implicit-GEMM conv2d + bias + activation on CUDA cores (plain FMA: no TF32, so the
// result keeps full fp32 accuracy whatever torch's TF32 flags say).
//
// One block of 256 threads computes a kBM x kBN = 64 x 64 tile of out[m, co]; thread
// (tm, tn) = (tid / 16, tid % 16) owns the 4 x 4 register block rows tm*4..+3, columns
// tn*4..+3. The K loop walks kBK = 16 columns at a time: each thread gathers 4 A elements
// (rows tid/16 + 16*i, column tid % 16: consecutive threads read consecutive channels of
// the NHWC input) and 4 B elements into registers, stores them k-major into shared memory,
// and prefetches the next tile's registers while computing on the current one.
//
// With kDgrad the same kernel computes the fp32 data gradient: the rows are x's pixels and
// A gathers grad_pre through decode_row_dgrad / a_offset_dgrad (conv2d_common.cuh).
#pragma once

#include <cstdint>

#include "conv2d_common.cuh"

namespace pyowt {
namespace conv2d_cuda {
namespace simt {

constexpr int kBM = 64;
constexpr int kBN = 64;
constexpr int kBK = 16;
constexpr int kThreads = 256;
constexpr int kTM = 4;
constexpr int kTN = 4;
// k-major shared tiles [kBK][kBM + 4]: rows stay 16-byte aligned for float4 reads and the
// +4 skews the transposing stores across banks.
constexpr int kLda = kBM + 4;
constexpr int kLdb = kBN + 4;
constexpr int kLoadRows = kThreads / kBK;  // 16 rows per load pass

static_assert((kBM / kTM) * (kBN / kTN) == kThreads, "one 4x4 block per thread");
static_assert(kBM == 4 * kLoadRows && kBN == 4 * kLoadRows, "4 A and 4 B elements per thread");

// x: NHWC fp32 input; w: (C_out, ldw) fp32 weight; bias may be null. With kDgrad, x is the
// NHWC grad_pre, w the (C_in, R*S*C_out) weight, bias null and p from dgrad_geometry.
template <bool kNhwcOut, bool kDgrad = false>
__global__ void __launch_bounds__(kThreads)
    conv2d_simt_kernel(const ConvParams p, const float* __restrict__ x, const float* __restrict__ w,
                       const float* __restrict__ bias, float* __restrict__ out) {
  __shared__ __align__(16) float As[kBK][kLda];
  __shared__ __align__(16) float Bs[kBK][kLdb];

  const int tid = threadIdx.x;
  const int m_block = blockIdx.x * kBM;
  const int n_block = blockIdx.y * kBN;
  const int num_kt = (p.K + kBK - 1) / kBK;

  const int ld_k = tid % kBK;    // column of the tile this thread loads
  const int ld_row = tid / kBK;  // + kLoadRows * i
  RowInfo rows[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int m = m_block + ld_row + kLoadRows * i;
    rows[i] = kDgrad ? decode_row_dgrad(p, m) : decode_row(p, m);
  }

  float a_reg[4];
  float b_reg[4];
  auto load_regs = [&](int kt) {
    const int k = kt * kBK + ld_k;
    const bool k_ok = k < p.K;
    int r, s, c;
    decode_k(p, k, r, s, c);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      int off;
      const bool ok =
          (kDgrad ? a_offset_dgrad(p, rows[i], r, s, c, off) : a_offset(p, rows[i], r, s, c, off)) && k_ok;
      a_reg[i] = ok ? x[off] : 0.f;
      const int co = n_block + ld_row + kLoadRows * i;
      const bool wok = k_ok && co < p.Cout;
      b_reg[i] = wok ? w[co * p.ldw + k] : 0.f;
    }
  };

  const int tm = tid / (kBN / kTN);
  const int tn = tid % (kBN / kTN);
  float acc[kTM][kTN];
#pragma unroll
  for (int i = 0; i < kTM; ++i) {
#pragma unroll
    for (int j = 0; j < kTN; ++j) acc[i][j] = 0.f;
  }

  if (num_kt > 0) load_regs(0);
  for (int kt = 0; kt < num_kt; ++kt) {
    // The previous iteration's closing barrier guarantees nobody still reads As/Bs.
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      As[ld_k][ld_row + kLoadRows * i] = a_reg[i];
      Bs[ld_k][ld_row + kLoadRows * i] = b_reg[i];
    }
    __syncthreads();
    if (kt + 1 < num_kt) load_regs(kt + 1);  // in flight during the FMAs below
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      const float4 a = *reinterpret_cast<const float4*>(&As[kk][tm * kTM]);
      const float4 b = *reinterpret_cast<const float4*>(&Bs[kk][tn * kTN]);
      const float av[4] = {a.x, a.y, a.z, a.w};
      const float bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
      for (int i = 0; i < kTM; ++i) {
#pragma unroll
        for (int j = 0; j < kTN; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < kTM; ++i) {
    const int m = m_block + tm * kTM + i;
#pragma unroll
    for (int j = 0; j < kTN; ++j) {
      const int co = n_block + tn * kTN + j;
      if (m < p.M && co < p.Cout) {
        out[out_offset<kNhwcOut>(p, m, co)] = epilogue_value(p, acc[i][j], bias, co);
      }
    }
  }
}

}  // namespace simt
}  // namespace conv2d_cuda
}  // namespace pyowt
