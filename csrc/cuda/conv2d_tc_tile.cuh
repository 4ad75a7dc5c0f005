// The tensor-core conv kernel's block tiles (conv2d_tc.cuh): the fixed block shape
// (128 output pixels, 128 threads as 2 x 2 warps or one warpgroup), the pipeline depths and
// TileShape, which derives every stage size, loader stride and shared-memory budget from a
// tile's width, K step and MMA kind.
#pragma once

#include "conv2d_wgmma.cuh"

namespace pyowt {
namespace conv2d_cuda {
namespace tc {

constexpr int kBM = 128;
constexpr int kThreads = 128;  // 4 warps, 2 x 2
constexpr int kWarpM = 64;
constexpr int kFragM = kWarpM / 16;
// Pipeline depth: the vector path (cp.async for A and B) keeps kVecStages tiles in flight;
// the scalar path (A staged through registers) double-buffers.
constexpr int kVecStages = 3;
constexpr int kScalarStages = 2;
constexpr int kMaxStages = kVecStages > kScalarStages ? kVecStages : kScalarStages;

static_assert(kThreads == 32 * (kBM / kWarpM) * 2, "2 x 2 warps");
static_assert(kBM == kThreads, "scalar A load: one row per thread");

// A block tile: kBM = 128 output pixels x kBN = 64, 96 or 128 channels, K steps of kBK = 32
// or 64 (64: the vector path only), multiplied by WMMA or (Wgmma, sm_90a, K steps of 64,
// vector path only) by wgmma (conv2d_wgmma.cuh), and what follows from them.
template <int BN, int BK, bool Wgmma = false>
struct TileShape {
  static constexpr int kBN = BN;
  static constexpr int kBK = BK;
  static constexpr bool kWgmma = Wgmma;
  static constexpr int kWarpN = kBN / 2;
  static constexpr int kFragN = kWarpN / 16;
  // Shared row pitch in elements. WMMA: kBK + 8 (80 or 144 bytes) keeps every 8-element
  // chunk 16-byte aligned (cp.async, uint4 stores), every 16x16 fragment origin 32-byte
  // aligned, and puts the 8 rows an ldmatrix reads on different banks. wgmma: 64, the
  // 128-byte swizzled rows its descriptors describe (the XOR does what the padding does).
  static constexpr int kLds = kWgmma ? kBK : kBK + 8;
  static constexpr int kAStage = kBM * kLds;  // elements per A stage
  static constexpr int kBStage = kBN * kLds;  // elements per B stage
  // Loaders: a row of the tile is kChunks16 16-byte chunks; thread tid takes chunk
  // tid % kChunks16 of rows tid / kChunks16 + kRowsPerPass * i.
  static constexpr int kChunks16 = kBK / 8;
  static constexpr int kRowsPerPass = kThreads / kChunks16;
  static constexpr int kAChunks = kBM / kRowsPerPass;  // A chunks per thread (vector path)
  static constexpr int kBChunks = kBN / kRowsPerPass;  // B chunks per thread
  static constexpr int kPipeBytes = kMaxStages * (kAStage + kBStage) * 2;
  // fp32 staging tile for the epilogue; +4 floats per row/column against bank conflicts
  // (WMMA needs the pitch to be a multiple of 4 floats).
  static constexpr int kLdcRow = kBN + 4;  // row-major [kBM][kLdcRow] for NHWC output
  static constexpr int kLdcCol = kBM + 4;  // column-major [kBN][kLdcCol] for NCHW output
  static constexpr int kCBytes = (kBM * kLdcRow > kBN * kLdcCol ? kBM * kLdcRow : kBN * kLdcCol) * 4;
  // Dynamic shared memory per block (above 48 KB needs the host's opt-in); wgmma tiles add
  // the slack that aligns their stages to 1024 bytes.
  static constexpr int kSmemBytes =
      (kPipeBytes > kCBytes ? kPipeBytes : kCBytes) + (kWgmma ? kSwizzleAtomBytes : 0);

  static_assert((kBN == 64 || kBN == 96 || kBN == 128) && (kBK == 32 || kBK == 64), "tile shapes");
  static_assert(kThreads % kChunks16 == 0 && kBM % kRowsPerPass == 0 && kBN % kRowsPerPass == 0,
                "whole chunks per thread");
  // Two blocks of the largest tile must fit an SM's 228 KB (1 KB per block reserved).
  static_assert(kSmemBytes <= 113 * 1024, "shared memory per block");
  static_assert(kBN % 8 == 0 && kLdcRow % 4 == 0, "NHWC epilogue: 8-channel runs, 16-byte rows");
  static_assert(!kWgmma || (kBK * 2 == kSwizzleRowBytes && kRowsPerPass % 8 == 0),
                "wgmma: one swizzled 128-byte row per K step, a thread's rows in one swizzle phase");
};
using Tile128x64x32 = TileShape<64, 32>;
using Tile128x128x32 = TileShape<128, 32>;
using Tile128x128x64 = TileShape<128, 64>;                  // vector path only
using Tile128x96x64 = TileShape<96, 64>;                    // vector path only
using TileWgmma128x64x64 = TileShape<64, 64, true>;         // vector path, sm_90a only
using TileWgmma128x96x64 = TileShape<96, 64, true>;         // vector path, sm_90a only
using TileWgmma128x128x64 = TileShape<128, 64, true>;       // vector path, sm_90a only

}  // namespace tc
}  // namespace conv2d_cuda
}  // namespace pyowt
