// fp16 -> bf16 in place, for fp16 checkpoints loaded onto the GPU.
#include <cuda_runtime.h>

#include "fp8kv/fp8.h"
#include "kernels/cuda/check.h"
#include "kernels/cuda/convert.h"

namespace fp8kv::cuda {

namespace {

// x [n]: half bits in, bf16 bits out. A grid-stride loop over pairs (one 32-bit word per step);
// the odd tail element, if any, by thread 0.
__global__ void f16_to_bf16_kernel(uint16_t* __restrict__ x, int64_t n) {
  const int64_t pairs = n / 2;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  // x is 2-byte aligned only when the slice starts at an odd element: fall back to halves then.
  if ((reinterpret_cast<uintptr_t>(x) & 3u) == 0) {
    auto* w = reinterpret_cast<uint32_t*>(x);
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < pairs;
         i += stride) {
      const uint32_t v = w[i];
      const uint32_t lo = f16_to_bf16(static_cast<uint16_t>(v & 0xffffu));
      const uint32_t hi = f16_to_bf16(static_cast<uint16_t>(v >> 16));
      w[i] = lo | (hi << 16);
    }
    if (n % 2 && blockIdx.x == 0 && threadIdx.x == 0) x[n - 1] = f16_to_bf16(x[n - 1]);
    return;
  }
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    x[i] = f16_to_bf16(x[i]);
  }
}

}  // namespace

void launch_f16_to_bf16(uint16_t* x, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  constexpr int kThreads = 256;
  const int64_t want = (n / 2 + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(want < 1 ? 1 : (want > 4096 ? 4096 : want));
  f16_to_bf16_kernel<<<blocks, kThreads, 0, stream>>>(x, n);
  FP8KV_CUDA_CHECK_LAUNCH("f16_to_bf16_kernel");
}

}  // namespace fp8kv::cuda
