// Explicit instantiations of the decode kernel for KvScheme::kBf16 (one file per scheme keeps
// each compile small and parallel).
#include "kernels/cuda/decode_kernel.cuh"
#include "kernels/cuda/decode_mma_kernel.cuh"

namespace fp8kv::cuda {
FP8KV_DECODE_INSTANTIATE(KvScheme::kBf16)
FP8KV_DECODE_MMA_INSTANTIATE(KvScheme::kBf16)
}  // namespace fp8kv::cuda
