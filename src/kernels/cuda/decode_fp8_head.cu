// Explicit instantiations of the decode kernel (decode_mma_kernel.cuh) for KvScheme::kFp8PerHead:
// one file per scheme keeps each compile small and parallel.
#include "kernels/cuda/decode_mma_kernel.cuh"

namespace fp8kv::cuda {
FP8KV_DECODE_MMA_INSTANTIATE(KvScheme::kFp8PerHead)
}  // namespace fp8kv::cuda
