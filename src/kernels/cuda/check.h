// The one CUDA error check (host code: the kernels, the CUDA backend, the NCCL communicator, the
// benchmark and the GPU tests all use it), and the one SM count of the launchers.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <string>

#include "fp8kv/error.h"

namespace fp8kv::cuda {

// Turns a CUDA error into fp8kv::Error naming the call and the CUDA error string.
inline void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    throw Error(std::string("CUDA error in ") + what + ": " + cudaGetErrorName(e) + ": " +
                cudaGetErrorString(e));
  }
}
#define FP8KV_CUDA_CHECK(call) ::fp8kv::cuda::check_cuda((call), #call)
// After a launch: configuration errors surface here, asynchronous ones at the next sync.
#define FP8KV_CUDA_CHECK_LAUNCH(name) ::fp8kv::cuda::check_cuda(cudaGetLastError(), name)

// The current device's SM count (grids sized to one wave, persistent grids), asked of the driver
// once per device: the launchers call it on every launch.
inline int device_sm_count() {
  int dev = 0;
  FP8KV_CUDA_CHECK(cudaGetDevice(&dev));
  static std::atomic<int> known[64];  // 0: not asked yet
  if (dev >= 0 && dev < 64) {
    const int v = known[dev].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int v = 0;
  FP8KV_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev));
  if (dev >= 0 && dev < 64) known[dev].store(v, std::memory_order_relaxed);
  return v;
}

}  // namespace fp8kv::cuda
