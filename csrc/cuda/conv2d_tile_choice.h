// Which tile shape the tensor-core conv kernel (conv2d_tc.cuh) runs a problem with.
//
// No shape wins everywhere: 128x128 halves the fragment loads per MMA but leaves a quarter
// of its tiles empty when C_out is 192 (AlexNet's conv2) and makes half as many blocks
// (fewer waves to balance over 132 SMs); K steps of 64 halve the barriers per MMA but need
// 95-108 KB of shared memory per block; 96 wide fits AlexNet's 192 and 384 channels and
// fills the last wave at 256 (conv4/conv5 at batch 128: 507 blocks, 1.92 waves at two per
// SM on 132 SMs, where every 64- or 128-wide tile that fits two or four per SM makes 1.28);
// the wgmma tiles (sm_90a) are Hopper's own tensor-core path, 64, 96 and 128 wide
// (candidates unless PYOWT_CUDA_CONV_WGMMA=0, conv2d.cu). So, like cuDNN's
// benchmark mode, the first call of each problem (device, dtype, loader, output layout,
// geometry) times every candidate on the GPU and later calls reuse the fastest. A
// candidate whose output disagrees with the first candidate's (128x64x32, the shape
// measured longest) is never picked: the wgmma tiles and 128x96x64 were written and checked
// on machines without a GPU, so the first call checks every candidate against it (with a
// warning). The environment variable PYOWT_CUDA_CONV_TILE = one of kTileNames forces a
// shape (tests, benchmarks; a problem whose A operand takes the scalar loader, which steps
// K by 32, runs the K-64 tiles as WMMA K-32 ones: 128x128x32, and 128x64x32 for widths up
// to 96); "auto" or unset times them. During CUDA graph capture nothing is timed (no
// synchronization is allowed there): an untimed problem runs 128x64x32.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace pyowt {
namespace conv2d_cuda {

enum class TcTile : int {
  k128x64x32,
  k128x128x32,
  k128x128x64,
  k128x96x64,
  kWgmma128x64x64,
  kWgmma128x96x64,
  kWgmma128x128x64
};

constexpr std::pair<TcTile, const char*> kTileNames[] = {
    {TcTile::k128x64x32, "128x64x32"},           {TcTile::k128x128x32, "128x128x32"},
    {TcTile::k128x128x64, "128x128x64"},         {TcTile::k128x96x64, "128x96x64"},
    {TcTile::kWgmma128x64x64, "wgmma128x64x64"}, {TcTile::kWgmma128x96x64, "wgmma128x96x64"},
    {TcTile::kWgmma128x128x64, "wgmma128x128x64"}};

inline const char* tile_name(TcTile tile) {
  for (const auto& [t, name] : kTileNames) {
    if (t == tile) return name;
  }
  return "?";
}

inline bool is_wgmma(TcTile tile) {
  return tile == TcTile::kWgmma128x64x64 || tile == TcTile::kWgmma128x96x64 || tile == TcTile::kWgmma128x128x64;
}

// The shape PYOWT_CUDA_CONV_TILE forces, or nullopt for "auto" / unset.
inline std::optional<TcTile> forced_tile(const char* op) {
  const char* env = std::getenv("PYOWT_CUDA_CONV_TILE");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return std::nullopt;
  std::string choices = "\"auto\"";
  for (const auto& [t, name] : kTileNames) {
    if (std::strcmp(env, name) == 0) return t;
    choices += std::string(", \"") + name + "\"";
  }
  TORCH_CHECK(false, op, ": PYOWT_CUDA_CONV_TILE must be one of ", choices, ", got \"", env, "\"");
  return std::nullopt;  // unreachable
}

// Whether the first-call timing considers the wgmma tiles: unset (or "1") yes, where
// wgmma_usable() says they can run; "0" leaves them out. They ran first on an H100 on
// 2026-11-27 (benchmarks/probe_wgmma.py in a process of its own, then the GPU test grid and
// the AlexNet benchmark, where they made the forward 1.56x cuDNN's): "0" stays as the way
// out should a device fault in them ever show up (such a fault poisons the process, which
// no output check can catch).
inline bool wgmma_in_auto(const char* op) {
  const char* env = std::getenv("PYOWT_CUDA_CONV_WGMMA");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "1") == 0) return true;
  TORCH_CHECK(std::strcmp(env, "0") == 0, op, ": PYOWT_CUDA_CONV_WGMMA must be \"0\" or \"1\", got \"", env,
              "\"");
  return false;
}

using TileKey = std::array<int64_t, 20>;

// The fastest of `candidates` for `key`, timing `launch(shape)` on `stream` the first time
// (a warm-up launch and three timed ones per shape; every launch writes the same output,
// so the caller's final launch overwrites nothing of value). `agrees(shape)`, called after
// each shape's launches, says whether the output it left matches the first candidate's;
// a shape that does not is skipped with a warning.
template <typename Launch, typename Agrees>
TcTile pick_tile(const TileKey& key, const std::vector<TcTile>& candidates, const Launch& launch,
                 const Agrees& agrees, const at::cuda::CUDAStream& stream) {
  static std::mutex mu;
  static std::map<TileKey, TcTile> picked;
  {
    const std::lock_guard<std::mutex> lock(mu);
    const auto it = picked.find(key);
    if (it != picked.end()) return it->second;
  }
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream.stream(), &capture));
  if (capture != cudaStreamCaptureStatusNone) return TcTile::k128x64x32;
  TcTile best = TcTile::k128x64x32;
  float best_ms = std::numeric_limits<float>::infinity();
  for (const TcTile t : candidates) {
    launch(t);
    at::cuda::CUDAEvent start(cudaEventDefault);
    at::cuda::CUDAEvent stop(cudaEventDefault);
    start.record(stream);
    for (int i = 0; i < 3; ++i) launch(t);
    stop.record(stream);
    stop.synchronize();
    const float ms = start.elapsed_time(stop);
    if (!agrees(t)) {
      TORCH_WARN("conv2d_bias_act (cuda): the ", tile_name(t), " tile's output differs from the ",
                 tile_name(candidates[0]), " tile's on this problem, so it is not used for it; please "
                 "report this with the GPU and the conv's shape");
      continue;
    }
    if (ms < best_ms) {
      best_ms = ms;
      best = t;
    }
  }
  const std::lock_guard<std::mutex> lock(mu);
  return picked.emplace(key, best).first->second;
}

// Lets `kernel` take `bytes` of dynamic shared memory (above 48 KB needs an opt-in), once per
// kernel and device, and asks for the largest shared-memory carveout: the tiles above 48 KB
// are sized for two blocks per SM (2 x 97-108 KB), which a smaller carveout would cut to one,
// and their copies bypass L1 (cp.async.cg), so L1 loses nothing it uses.
inline void allow_dynamic_smem(const void* kernel, int bytes) {
  if (bytes <= 48 * 1024) return;
  static std::mutex mu;
  static std::set<std::pair<const void*, int>> done;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const std::lock_guard<std::mutex> lock(mu);
  if (done.count({kernel, device}) != 0) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                      cudaSharedmemCarveoutMaxShared));
  done.insert({kernel, device});
}

}  // namespace conv2d_cuda
}  // namespace pyowt
