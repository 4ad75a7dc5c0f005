// Hopper warpgroup MMA (wgmma, sm_90a) for the tensor-core conv kernel's wgmma tiles
// (conv2d_tc.cuh, TileShape<..., kWgmma = true>: 64, 96 or 128 channels wide; 96 because
// AlexNet's 192 and 384 channels are multiples of it and its 507 blocks for conv4 and conv5
// at batch 128 make 1.9 waves on 132 SMs at two blocks each, where 128-wide tiles make 1.3).
//
// Why: on an H100 the WMMA tiles (mma.sync, HMMA in SASS) measured 145-180 TFLOP/s on
// AlexNet's conv2-5 where cuDNN reached 290-410 (benchmarks/RESULTS.md); wgmma is the
// Hopper instruction behind those figures. A warpgroup (the block's 4 warps) issues
// m64nNk16 products whose operands the tensor cores read from shared memory through
// 64-bit descriptors, asynchronously; the accumulators stay in registers.
//
// Shared-memory layout both operands use (K-major, "128-byte swizzle"): a tile row holds 64
// 16-bit k's = 128 bytes = 8 chunks of 16 bytes; chunk c of row r sits at chunk position
// c ^ (r % 8) of that row; rows are 128 bytes apart, so 8 rows make a 1024-byte atom, and a
// stage starts 1024-byte aligned (the swizzle is a function of the address bits). The
// descriptor of an operand starting at row 0 of a stage: start address, stride between
// 8-row groups (1024 bytes), swizzle mode 128B; k16 step j of the 64 starts 32*j bytes in
// (the hardware applies the same XOR to the shifted address). Accumulator layout of
// m64nN (f32): thread t of warp w holds, for each 8-column group g8 and h, j in {0, 1},
// d[g8*4 + h*2 + j] = D[w*16 + (t/4) + 8*h][g8*8 + 2*(t%4) + j].
//
// tests/ops/conv2d_cuda_emulation.py models this layout (the loaders' swizzled writes and
// what a descriptor reads back) and the accumulator mapping.
#pragma once

#include <cstdint>

// wgmma exists only in the sm_90a instruction set; other targets compile a trap (the host
// launches the wgmma tiles only on sm_90 devices with an sm_90a build, conv2d.cu).
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define PYOWT_WGMMA 1
#else
#define PYOWT_WGMMA 0
#endif

namespace pyowt {
namespace conv2d_cuda {
namespace tc {

constexpr int kSwizzleRowBytes = 128;   // one K step of 64 16-bit elements
constexpr int kSwizzleAtomBytes = 1024;  // 8 rows

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Descriptor of a K-major, 128B-swizzled operand whose first row starts at `addr` (shared
// window, 16-byte units in the descriptor): leading byte offset 16 (unused by this layout),
// stride byte offset 1024 between 8-row groups, swizzle mode 1 (128B) in bits 62-63.
__device__ __forceinline__ uint64_t swizzled_descriptor(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(16 >> 4) << 16) |
         (static_cast<uint64_t>(kSwizzleAtomBytes >> 4) << 32) | (static_cast<uint64_t>(1) << 62);
}

// An sm_90a-only instruction without operands (nothing on other targets).
#if PYOWT_WGMMA
#define PYOWT_SM90A_ASM(text) asm volatile(text "\n" ::: "memory")
#else
#define PYOWT_SM90A_ASM(text)
#endif

__device__ __forceinline__ void wgmma_fence() { PYOWT_SM90A_ASM("wgmma.fence.sync.aligned;"); }
__device__ __forceinline__ void wgmma_commit() { PYOWT_SM90A_ASM("wgmma.commit_group.sync.aligned;"); }
// Waits until every committed wgmma of this warpgroup has completed (its accumulators
// written, its shared-memory reads done).
__device__ __forceinline__ void wgmma_wait_all() { PYOWT_SM90A_ASM("wgmma.wait_group.sync.aligned 0;"); }
// Shared memory written by the generic proxy (cp.async, st.shared) is read by wgmma through
// the async proxy: each writer fences after its writes land, before the barrier.
__device__ __forceinline__ void fence_shared_for_async_proxy() {
  PYOWT_SM90A_ASM("fence.proxy.async.shared::cta;");
}

#undef PYOWT_SM90A_ASM

// Pins an accumulator register at this point of the program: accumulators read after
// wgmma_wait_all must not be read earlier, and ones written before a wgmma
// must be written before it.
__device__ __forceinline__ void pin_register(float& v) { asm volatile("" : "+f"(v)::"memory"); }

#define PYOWT_WGMMA_REGS32                                                            \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "             \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define PYOWT_WGMMA_REGS48                                                            \
  PYOWT_WGMMA_REGS32 ", "                                                             \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47"
#define PYOWT_WGMMA_REGS64                                                            \
  PYOWT_WGMMA_REGS32 ", "                                                             \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "  \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define PYOWT_WGMMA_ACC32(d)                                                                          \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),      \
      "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]),         \
      "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]),       \
      "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]),       \
      "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define PYOWT_WGMMA_ACC48(d)                                                                          \
  PYOWT_WGMMA_ACC32(d), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), \
      "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]),       \
      "+f"(d[45]), "+f"(d[46]), "+f"(d[47])
#define PYOWT_WGMMA_ACC64(d)                                                                          \
  PYOWT_WGMMA_ACC32(d), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), \
      "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]),       \
      "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]),       \
      "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]),       \
      "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
// D += A * B for one m64nNk16 (scale-d = 1: accumulate; A, B unscaled and K-major).
#define PYOWT_WGMMA_ASM(SHAPE_TYPES, REGS, DESC_A, DESC_B, PRED, ACC)                     \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " PRED ", 0;\n"                          \
               "wgmma.mma_async.sync.aligned." SHAPE_TYPES " {" REGS "}, " DESC_A ", " DESC_B \
               ", p, 1, 1, 0, 0;\n}\n"                                                    \
               : ACC                                                                      \
               : "l"(desc_a), "l"(desc_b), "r"(1))

// One m64 x kN x k16 product of the warpgroup, 16-bit inputs (kBf16: bf16, else fp16),
// fp32 accumulators d (kN / 2 per thread).
template <int kN, bool kBf16>
__device__ __forceinline__ void wgmma_m64k16(float (&d)[kN / 2], uint64_t desc_a, uint64_t desc_b) {
  static_assert(kN == 64 || kN == 96 || kN == 128, "wgmma tiles are 64, 96 or 128 channels wide");
#if PYOWT_WGMMA
  if constexpr (kN == 64 && kBf16) {
    PYOWT_WGMMA_ASM("m64n64k16.f32.bf16.bf16", PYOWT_WGMMA_REGS32, "%32", "%33", "%34", PYOWT_WGMMA_ACC32(d));
  } else if constexpr (kN == 64) {
    PYOWT_WGMMA_ASM("m64n64k16.f32.f16.f16", PYOWT_WGMMA_REGS32, "%32", "%33", "%34", PYOWT_WGMMA_ACC32(d));
  } else if constexpr (kN == 96 && kBf16) {
    PYOWT_WGMMA_ASM("m64n96k16.f32.bf16.bf16", PYOWT_WGMMA_REGS48, "%48", "%49", "%50", PYOWT_WGMMA_ACC48(d));
  } else if constexpr (kN == 96) {
    PYOWT_WGMMA_ASM("m64n96k16.f32.f16.f16", PYOWT_WGMMA_REGS48, "%48", "%49", "%50", PYOWT_WGMMA_ACC48(d));
  } else if constexpr (kBf16) {
    PYOWT_WGMMA_ASM("m64n128k16.f32.bf16.bf16", PYOWT_WGMMA_REGS64, "%64", "%65", "%66", PYOWT_WGMMA_ACC64(d));
  } else {
    PYOWT_WGMMA_ASM("m64n128k16.f32.f16.f16", PYOWT_WGMMA_REGS64, "%64", "%65", "%66", PYOWT_WGMMA_ACC64(d));
  }
#else
  __trap();
#endif
}

#undef PYOWT_WGMMA_ASM
#undef PYOWT_WGMMA_ACC64
#undef PYOWT_WGMMA_ACC48
#undef PYOWT_WGMMA_ACC32
#undef PYOWT_WGMMA_REGS64
#undef PYOWT_WGMMA_REGS48
#undef PYOWT_WGMMA_REGS32

}  // namespace tc
}  // namespace conv2d_cuda
}  // namespace pyowt
