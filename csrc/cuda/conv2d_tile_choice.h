// Which tile shape the tensor-core conv kernel (conv2d_tc.cuh) runs a problem with.
//
// No shape wins everywhere: 128x128 halves the fragment loads per MMA but leaves a quarter
// of its tiles empty when C_out is 192 (AlexNet's conv2) and makes half as many blocks
// (fewer waves to balance over 132 SMs); K steps of 64 halve the barriers per MMA but need
// 108 KB of shared memory per block. So, like cuDNN's benchmark mode, the first call of each
// problem (device, dtype, loader, output layout, geometry) times every candidate on the GPU
// and later calls reuse the fastest. The environment variable PYOWT_CUDA_CONV_TILE =
// "128x64x32" | "128x128x32" | "128x128x64" forces a shape (tests, benchmarks; a problem
// whose A operand takes the scalar loader, which steps K by 32, runs 128x128x64 as
// 128x128x32); "auto" or unset times them. During CUDA graph capture nothing is timed (no
// synchronization is allowed there): an untimed problem runs 128x64x32, the shape measured
// longest.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <utility>

namespace pyowt {
namespace conv2d_cuda {

enum class TcTile : int { k128x64x32 = 0, k128x128x32 = 1, k128x128x64 = 2 };

// The shape PYOWT_CUDA_CONV_TILE forces, or nullopt for "auto" / unset.
inline std::optional<TcTile> forced_tile(const char* op) {
  const char* env = std::getenv("PYOWT_CUDA_CONV_TILE");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return std::nullopt;
  if (std::strcmp(env, "128x64x32") == 0) return TcTile::k128x64x32;
  if (std::strcmp(env, "128x128x32") == 0) return TcTile::k128x128x32;
  if (std::strcmp(env, "128x128x64") == 0) return TcTile::k128x128x64;
  TORCH_CHECK(false, op,
              ": PYOWT_CUDA_CONV_TILE must be \"auto\", \"128x64x32\", \"128x128x32\" or \"128x128x64\", "
              "got \"", env, "\"");
  return std::nullopt;  // unreachable
}

using TileKey = std::array<int64_t, 19>;

// The fastest of `candidates` for `key`, timing `launch(shape)` on `stream` the first time
// (a warm-up launch and three timed ones per shape; every launch writes the same output,
// so the caller's final launch overwrites nothing of value).
template <typename Launch>
TcTile pick_tile(const TileKey& key, std::initializer_list<TcTile> candidates, const Launch& launch,
                 const at::cuda::CUDAStream& stream) {
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
    if (ms < best_ms) {
      best_ms = ms;
      best = t;
    }
  }
  const std::lock_guard<std::mutex> lock(mu);
  return picked.emplace(key, best).first->second;
}

// Lets `kernel` take `bytes` of dynamic shared memory (above 48 KB needs an opt-in), once per
// kernel and device.
inline void allow_dynamic_smem(const void* kernel, int bytes) {
  if (bytes <= 48 * 1024) return;
  static std::mutex mu;
  static std::set<std::pair<const void*, int>> done;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const std::lock_guard<std::mutex> lock(mu);
  if (done.count({kernel, device}) != 0) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  done.insert({kernel, device});
}

}  // namespace conv2d_cuda
}  // namespace pyowt
