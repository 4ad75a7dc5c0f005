// Tensor-core implicit-GEMM conv2d + bias + activation for fp16 / bf16 (sm_80+).
//
// One block computes a kBM x kBN tile of out[m, co] (m = output pixel, co = output channel)
// with 4 warps in a 2 x 2 grid, each warp a 64 x kBN/2 sub-tile of 16x16x16 WMMA fragments
// accumulating in fp32. Four tile shapes (TileShape, M x N x K step): 128x64x32 (warp tiles
// 64 x 32), 128x128x32 (warp tiles 64 x 64: twice the MMAs per fragment load, half the
// blocks, two blocks per SM), 128x128x64 (the same with half the K steps, so half the
// barriers and loop overhead per MMA; 108 KB of shared memory, vector path only) and
// 128x96x64 (warp tiles 64 x 48: AlexNet's 192/384 channels without padding, fuller last
// waves at 256; 95 KB, vector path only). On sm_90
// with an sm_90a build three more run the same block tile on Hopper's wgmma instead of WMMA
// (128x64x64, 128x96x64 and 128x128x64, the 4 warps as one warpgroup, swizzled stages,
// vector path only: conv2d_wgmma.cuh). The host picks one per problem by timing them
// (conv2d_tile_choice.h). The K loop walks kBK
// columns at a time through shared-memory stages (three when A arrives by cp.async, two
// when it is staged through registers):
//   * B (weight, (C_out, ldw) with ldw a multiple of 8 and zero columns past K) always
//     arrives by 16-byte cp.async, zero-filled past C_out and past ldw.
//   * A (NHWC activations) arrives by 16-byte cp.async when C_in % 8 == 0 and x is 16-byte
//     aligned (8 consecutive k then share one (r, s) and are contiguous channels), and
//     otherwise (e.g. AlexNet's conv1, C_in = 3) element by element through registers:
//     each thread owns one row and gathers its 32 k's (kBK = 32), stepping (r, s, c)
//     incrementally.
//     Out-of-image, past-M and past-K elements are zero, so the K tail needs no special case.
// The epilogue stages the fp32 tile through shared memory (reusing the pipeline buffers),
// adds the bias, applies ReLU and writes every in-range element once, in NHWC or NCHW
// order (the shared tile is stored row- or column-major so that consecutive threads read
// consecutive words and write consecutive addresses).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "conv2d_common.cuh"
#include "conv2d_tc_tile.cuh"
#include "conv2d_wgmma.cuh"

namespace pyowt {
namespace conv2d_cuda {
namespace tc {

// Maps at::Half / at::BFloat16 to the CUDA type WMMA takes (same bits).
template <typename scalar_t>
struct WmmaType;
template <>
struct WmmaType<at::Half> {
  using type = __half;
};
template <>
struct WmmaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

// Fragment loads from shared memory. nvcc gives WMMA's fp16 loads the .shared state space
// (ldmatrix in SASS) but emits its bf16 loads generic, which ptxas turns into 48 32-bit
// generic loads per K step instead of 12 LDSM.x4 (seen in the sm_90 SASS of this kernel).
// The bf16 overloads issue the same PTX wmma.load with .shared and a shared-window address;
// the fragment registers are the ones the WMMA builtin fills (4 x b32 = 8 bf16 each).
template <typename Frag, typename T>
__device__ __forceinline__ void load_fragment(Frag& f, const T* p, unsigned ldm) {
  nvcuda::wmma::load_matrix_sync(f, p, ldm);
}

__device__ __forceinline__ void load_fragment(
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __nv_bfloat16, nvcuda::wmma::row_major>& f,
    const __nv_bfloat16* p, unsigned ldm) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(p));
  uint32_t* r = reinterpret_cast<uint32_t*>(f.x);
  asm volatile("wmma.load.a.sync.aligned.row.m16n16k16.shared.bf16 {%0, %1, %2, %3}, [%4], %5;\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr), "r"(ldm)
               : "memory");
}

__device__ __forceinline__ void load_fragment(
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, __nv_bfloat16, nvcuda::wmma::col_major>& f,
    const __nv_bfloat16* p, unsigned ldm) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(p));
  uint32_t* r = reinterpret_cast<uint32_t*>(f.x);
  asm volatile("wmma.load.b.sync.aligned.col.m16n16k16.shared.bf16 {%0, %1, %2, %3}, [%4], %5;\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr), "r"(ldm)
               : "memory");
}

static_assert(sizeof(nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __nv_bfloat16,
                                            nvcuda::wmma::row_major>::x) == 16,
              "bf16 matrix_a fragment: 4 x b32");
static_assert(sizeof(nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, __nv_bfloat16,
                                            nvcuda::wmma::col_major>::x) == 16,
              "bf16 matrix_b fragment: 4 x b32");

// The epilogue's second half: the fp32 tile staged in shared memory (Cs: row-major
// [kBM][kLdcRow] for NHWC output, column-major [kBN][kLdcCol] for NCHW) plus bias, through
// the activation, to every in-range element of out, once.
template <typename scalar_t, typename Tile, bool kNhwcOut>
__device__ __forceinline__ void store_tile(const ConvParams& p, const float* Cs, int m_block, int n_block,
                                           const scalar_t* __restrict__ bias, scalar_t* __restrict__ out,
                                           int tid) {
  constexpr int kBN = Tile::kBN;
  constexpr int kLdcRow = Tile::kLdcRow;
  constexpr int kLdcCol = Tile::kLdcCol;
  if constexpr (kNhwcOut) {
    // Eight consecutive channels of one pixel per step: two 16-byte shared loads and one
    // 16-byte global store when all eight are in range and out (and bias) are 16-byte
    // aligned with C_out % 8 == 0; element by element otherwise (partial last channel
    // block, odd C_out, offset views). kBN % 8 == 0, so a run never leaves the tile.
    const bool vec_out = p.Cout % 8 == 0 && (reinterpret_cast<uintptr_t>(out) & 15) == 0;
    const bool vec_bias = bias != nullptr && (reinterpret_cast<uintptr_t>(bias) & 15) == 0;
    for (int run = tid; run < kBM * kBN / 8; run += kThreads) {
      const int ml = run / (kBN / 8);
      const int nl = (run - ml * (kBN / 8)) * 8;
      const int m = m_block + ml;
      const int co = n_block + nl;
      if (m >= p.M) continue;
      const float4 lo = *reinterpret_cast<const float4*>(Cs + ml * kLdcRow + nl);
      const float4 hi = *reinterpret_cast<const float4*>(Cs + ml * kLdcRow + nl + 4);
      float v[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
      if (vec_out && co + 8 <= p.Cout) {
        if (vec_bias) {
          const uint4 braw = *reinterpret_cast<const uint4*>(bias + co);
          const scalar_t* b8 = reinterpret_cast<const scalar_t*>(&braw);
#pragma unroll
          for (int j = 0; j < 8; ++j) v[j] += static_cast<float>(b8[j]);
        } else if (bias != nullptr) {
#pragma unroll
          for (int j = 0; j < 8; ++j) v[j] += static_cast<float>(bias[co + j]);
        }
        uint4 packed;
        scalar_t* o8 = reinterpret_cast<scalar_t*>(&packed);
#pragma unroll
        for (int j = 0; j < 8; ++j) o8[j] = static_cast<scalar_t>(p.relu && v[j] < 0.f ? 0.f : v[j]);
        *reinterpret_cast<uint4*>(out + out_offset<true>(p, m, co)) = packed;
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          if (co + j < p.Cout) {
            out[out_offset<true>(p, m, co + j)] = static_cast<scalar_t>(epilogue_value(p, v[j], bias, co + j));
          }
        }
      }
    }
  } else {
    for (int idx = tid; idx < kBM * kBN; idx += kThreads) {
      const int nl = idx / kBM;
      const int ml = idx - nl * kBM;
      const float v = Cs[nl * kLdcCol + ml];
      const int m = m_block + ml;
      const int co = n_block + nl;
      if (m < p.M && co < p.Cout) {
        out[out_offset<false>(p, m, co)] = static_cast<scalar_t>(epilogue_value(p, v, bias, co));
      }
    }
  }
}

// x: NHWC input as raw 16-bit words; w: (C_out, ldw) weight words; bias may be null.
// Launched with Tile::kSmemBytes of dynamic shared memory.
template <typename scalar_t, typename Tile, bool kVecA, bool kNhwcOut>
__global__ void __launch_bounds__(kThreads)
    conv2d_tc_kernel(const ConvParams p, const uint16_t* __restrict__ x, const uint16_t* __restrict__ w,
                     const scalar_t* __restrict__ bias, scalar_t* __restrict__ out) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // the host never launches this below sm_80
#else
  using namespace nvcuda;
  using T = typename WmmaType<scalar_t>::type;
  constexpr int kBN = Tile::kBN;
  constexpr int kBK = Tile::kBK;
  constexpr int kLds = Tile::kLds;
  constexpr int kWarpN = Tile::kWarpN;
  constexpr int kFragN = Tile::kFragN;
  constexpr int kAStage = Tile::kAStage;
  constexpr int kBStage = Tile::kBStage;
  constexpr int kAChunks = Tile::kAChunks;
  constexpr int kRowsPerPass = Tile::kRowsPerPass;
  constexpr int kLdcRow = Tile::kLdcRow;
  constexpr int kLdcCol = Tile::kLdcCol;
  constexpr bool kWgmma = Tile::kWgmma;
  static_assert(kVecA || kBK == 32, "the scalar A loader gathers one row of 32 per thread");
  static_assert(kVecA || !kWgmma, "wgmma tiles take the vector A loader");

  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char* smem = smem_raw;
  if constexpr (kWgmma) {  // stages start on a 1024-byte swizzle atom
    smem += (kSwizzleAtomBytes - (shared_address(smem_raw) & (kSwizzleAtomBytes - 1))) & (kSwizzleAtomBytes - 1);
  }
  uint16_t* const As = reinterpret_cast<uint16_t*>(smem);  // [stages][kBM][kLds]
  uint16_t* const Bs = As + kMaxStages * kAStage;           // [stages][kBN][kLds]

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int wm = warp >> 1;  // warp row: pixels wm*64 .. +63 of the tile
  const int wn = warp & 1;   // warp column: channels wn*kWarpN .. +kWarpN-1 of the tile
  const int m_block = blockIdx.x * kBM;
  const int n_block = blockIdx.y * kBN;
  const int num_kt = (p.K + kBK - 1) / kBK;

  // Vector A loader: thread tid loads columns ld_col .. +7 of rows ld_row + kRowsPerPass * i
  // (i < kAChunks). The same column chunk, so the same tap (r, s, c), for all its rows: per
  // row it keeps the corner (ih0, iw0) of its receptive field and the corner's element
  // offset, and a tap costs each row one add and two unsigned range checks, its offset
  // tap = (r*dh*W + s*dw)*C + c being computed once. Offsets are unsigned: the corner's may
  // lie in the padding (negative), the sum wraps to the element's true offset whenever the
  // range checks pass. A row past M gets ih0 = kOutside, which no tap brings into [0, H).
  const int ld_row = tid / Tile::kChunks16;
  const int ld_col = (tid % Tile::kChunks16) * 8;
  // Shared offset of this thread's chunk in tile row `row` (A and B alike). wgmma tiles: row
  // & 7 == ld_row & 7 for all the thread's rows (kRowsPerPass % 8 == 0), one XOR per thread.
  const int swizzled_col = (((ld_col >> 3) ^ (ld_row & 7)) << 3);
  auto chunk_slot = [&](int row) { return row * kLds + (kWgmma ? swizzled_col : ld_col); };
  constexpr int kOutside = -(1 << 30);
  int vrow_ih0[kVecA ? kAChunks : 1], vrow_iw0[kVecA ? kAChunks : 1];
  unsigned vrow_off[kVecA ? kAChunks : 1];
  if constexpr (kVecA) {
#pragma unroll
    for (int i = 0; i < kAChunks; ++i) {
      const RowInfo ri = decode_row(p, m_block + ld_row + kRowsPerPass * i);
      vrow_ih0[i] = ri.ok ? ri.ih0 : kOutside;
      vrow_iw0[i] = ri.iw0;
      vrow_off[i] = static_cast<unsigned>(ri.base) +
                    (static_cast<unsigned>(ri.ih0) * p.W + static_cast<unsigned>(ri.iw0)) * p.C;
    }
  }
  // Scalar A loader: thread tid owns row tid and all 32 columns.
  const RowInfo srow = decode_row(p, m_block + tid);
  uint32_t a_regs[kBK / 2];  // 32 16-bit words, packed in pairs (scalar path only)

  // The vector loader's k = (r, s, c) for the next tile it loads. Tiles load in order
  // (0, 1, 2, ...), so (r, s, c) advances by kBK each time as a mixed-radix addition
  // (kBK = dr*S*C + ds*C + dc, one carry per digit) instead of being decoded with two
  // integer divisions per K step.
  int va_k = ld_col, va_r = 0, va_s = 0, va_c = 0, va_dr = 0, va_ds = 0, va_dc = 0;
  if constexpr (kVecA) {
    decode_k(p, ld_col, va_r, va_s, va_c);
    decode_k(p, kBK, va_dr, va_ds, va_dc);
  }
  auto load_a_vec = [&](int stage) {
    const bool k_ok = va_k < p.K;
    const int rdh = va_r * p.dh;
    const int sdw = va_s * p.dw;
    const unsigned tap = (static_cast<unsigned>(rdh) * p.W + static_cast<unsigned>(sdw)) * p.C + va_c;
#pragma unroll
    for (int i = 0; i < kAChunks; ++i) {
      const bool ok = k_ok && static_cast<unsigned>(vrow_ih0[i] + rdh) < static_cast<unsigned>(p.H) &&
                      static_cast<unsigned>(vrow_iw0[i] + sdw) < static_cast<unsigned>(p.W);
      const unsigned off = vrow_off[i] + tap;
      cp_async_16(As + stage * kAStage + chunk_slot(ld_row + kRowsPerPass * i), x + (ok ? off : 0u), ok);
    }
    va_k += kBK;
    va_c += va_dc;
    const bool carry_c = va_c >= p.C;
    if (carry_c) va_c -= p.C;
    va_s += va_ds + (carry_c ? 1 : 0);
    const bool carry_s = va_s >= p.S;
    if (carry_s) va_s -= p.S;
    va_r += va_dr + (carry_s ? 1 : 0);
  };

  auto load_a_regs = [&](int kt) {
    const int k0 = kt * kBK;
    int r, s, c;
    decode_k(p, k0, r, s, c);
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      int off;
      const bool ok = a_offset(p, srow, r, s, c, off) && (k0 + kk < p.K);
      const uint32_t v = ok ? static_cast<uint32_t>(x[off]) : 0u;
      if (kk % 2 == 0) {
        a_regs[kk / 2] = v;
      } else {
        a_regs[kk / 2] |= v << 16;
      }
      if (++c == p.C) {
        c = 0;
        if (++s == p.S) {
          s = 0;
          ++r;
        }
      }
    }
  };

  auto store_a_regs = [&](int stage) {
    uint4* dst = reinterpret_cast<uint4*>(As + stage * kAStage + tid * kLds);
#pragma unroll
    for (int j = 0; j < kBK / 8; ++j) {
      dst[j] = make_uint4(a_regs[4 * j], a_regs[4 * j + 1], a_regs[4 * j + 2], a_regs[4 * j + 3]);
    }
  };

  auto load_b = [&](int kt, int stage) {
    const int k0 = kt * kBK + ld_col;
#pragma unroll
    for (int i = 0; i < Tile::kBChunks; ++i) {
      const int co = n_block + ld_row + kRowsPerPass * i;
      const bool ok = co < p.Cout && k0 < p.ldw;
      cp_async_16(Bs + stage * kBStage + chunk_slot(ld_row + kRowsPerPass * i), w + (ok ? co * p.ldw + k0 : 0),
                  ok);
    }
  };

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kFragM][kFragN];
  // wgmma tiles: the two m64 halves of the tile, kBN / 2 accumulators each per thread.
  float wacc[2][kWgmma ? kBN / 2 : 1];
  if constexpr (kWgmma) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int i = 0; i < kBN / 2; ++i) wacc[h][i] = 0.f;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kFragM; ++i) {
#pragma unroll
      for (int j = 0; j < kFragN; ++j) wmma::fill_fragment(acc[i][j], 0.f);
    }
  }
  auto pin_accumulators = [&] {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int i = 0; i < (kWgmma ? kBN / 2 : 1); ++i) pin_register(wacc[h][i]);
    }
  };

  // wgmma: 4 k16 steps x 2 m64 halves; the k16 step j starts 32*j bytes into the swizzled
  // rows. Issued asynchronously; wgmma_wait (before the next barrier, which frees the
  // stage) waits for the products.
  auto wgmma_issue = [&](int stage) {
    if constexpr (kWgmma) {
      const uint32_t a0 = shared_address(As + stage * kAStage);
      const uint32_t b0 = shared_address(Bs + stage * kBStage);
      pin_accumulators();
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < kBK / 16; ++ks) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          wgmma_m64k16<kBN, std::is_same<scalar_t, at::BFloat16>::value>(
              wacc[h], swizzled_descriptor(a0 + h * 64 * kSwizzleRowBytes + ks * 32),
              swizzled_descriptor(b0 + ks * 32));
        }
      }
      wgmma_commit();
    }
  };
  auto wgmma_wait = [&] {
    if constexpr (kWgmma) {
      wgmma_wait_all();
      pin_accumulators();
    }
  };

  auto compute_wmma = [&](int stage) {
    const T* a_s = reinterpret_cast<const T*>(As + stage * kAStage);
    const T* b_s = reinterpret_cast<const T*>(Bs + stage * kBStage);
#pragma unroll
    for (int ks = 0; ks < kBK / 16; ++ks) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[kFragM];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[kFragN];
#pragma unroll
      for (int i = 0; i < kFragM; ++i) {
        load_fragment(fa[i], a_s + (wm * kWarpM + i * 16) * kLds + ks * 16, kLds);
      }
#pragma unroll
      for (int j = 0; j < kFragN; ++j) {
        // B stored [co][k]: a K x N matrix in column-major order with pitch kLds.
        load_fragment(fb[j], b_s + (wn * kWarpN + j * 16) * kLds + ks * 16, kLds);
      }
#pragma unroll
      for (int i = 0; i < kFragM; ++i) {
#pragma unroll
        for (int j = 0; j < kFragN; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
    }
  };

  if constexpr (kVecA) {
    // kVecStages-deep cp.async pipeline, one barrier per K step. Tiles load in order into
    // stage t % kVecStages, one commit group per tile (empty groups past the last tile keep
    // the count uniform). Iteration kt waits until at most kVecStages - 2 groups are in
    // flight (so tile kt has landed), and the barrier makes every thread's copies of tile
    // kt visible; only then are the loads of tile kt + kVecStages - 1 issued, into the stage
    // that held tile kt - 1, which every thread finished computing on before this barrier.
#pragma unroll
    for (int t = 0; t < kVecStages - 1; ++t) {
      if (t < num_kt) {
        load_a_vec(t);
        load_b(t, t);
      }
      cp_async_commit();
    }
    int stage = 0;  // kt % kVecStages
    for (int kt = 0; kt < num_kt; ++kt) {
      cp_async_wait<kVecStages - 2>();
      if constexpr (kWgmma) fence_shared_for_async_proxy();
      __syncthreads();
      // wgmma: the tensor cores work on tile kt while the warpgroup issues the next loads
      // (into the stage of tile kt - 1, whose products the last iteration waited for).
      wgmma_issue(stage);
      const int next = kt + kVecStages - 1;
      if (next < num_kt) {
        const int next_stage = stage == 0 ? kVecStages - 1 : stage - 1;  // next % kVecStages
        load_a_vec(next_stage);
        load_b(next, next_stage);
      }
      cp_async_commit();
      if constexpr (kWgmma) {
        wgmma_wait();
      } else {
        compute_wmma(stage);
      }
      stage = stage == kVecStages - 1 ? 0 : stage + 1;
    }
    cp_async_wait<0>();
  } else {
    // Two stages. Iteration kt first issues the B loads of tile kt+1 into the other stage
    // (last read in iteration kt-1, which every thread finished before that iteration's
    // closing barrier) and gathers its A into registers, waits for tile kt, computes on
    // it, then parks the register-held A of tile kt+1 into the other stage.
    if (num_kt > 0) {
      load_a_regs(0);
      store_a_regs(0);
      load_b(0, 0);
      cp_async_commit();
    }
    for (int kt = 0; kt < num_kt; ++kt) {
      const int stage = kt & 1;
      const bool has_next = kt + 1 < num_kt;
      if (has_next) {
        load_b(kt + 1, stage ^ 1);
        cp_async_commit();
        load_a_regs(kt + 1);
        cp_async_wait<1>();  // tile kt has landed; tile kt+1 may still be in flight
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
      compute_wmma(stage);
      if (has_next) store_a_regs(stage ^ 1);
      __syncthreads();
    }
  }

  // Epilogue: the pipeline buffers are free (closing barrier above, no cp.async pending).
  __syncthreads();
  float* const Cs = reinterpret_cast<float*>(smem);
  if constexpr (kWgmma) {
    // Accumulator (h, g8, hh, j) of this thread is D[h*64 + warp*16 + lane/4 + 8*hh]
    // [g8*8 + 2*(lane%4) + j] (conv2d_wgmma.cuh).
    const int lane = tid & 31;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int i = 0; i < kBN / 2; ++i) {
        const int ml = h * 64 + warp * 16 + (lane >> 2) + 8 * ((i >> 1) & 1);
        const int nl = (i >> 2) * 8 + 2 * (lane & 3) + (i & 1);
        if constexpr (kNhwcOut) {
          Cs[ml * kLdcRow + nl] = wacc[h][i];
        } else {
          Cs[nl * kLdcCol + ml] = wacc[h][i];
        }
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < kFragM; ++i) {
#pragma unroll
      for (int j = 0; j < kFragN; ++j) {
        const int m0 = wm * kWarpM + i * 16;
        const int n0 = wn * kWarpN + j * 16;
        if constexpr (kNhwcOut) {
          wmma::store_matrix_sync(Cs + m0 * kLdcRow + n0, acc[i][j], kLdcRow, wmma::mem_row_major);
        } else {
          wmma::store_matrix_sync(Cs + n0 * kLdcCol + m0, acc[i][j], kLdcCol, wmma::mem_col_major);
        }
      }
    }
  }
  __syncthreads();
  store_tile<scalar_t, Tile, kNhwcOut>(p, Cs, m_block, n_block, bias, out, tid);
#endif
}

}  // namespace tc
}  // namespace conv2d_cuda
}  // namespace pyowt
