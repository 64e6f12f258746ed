// Explicit instantiations of the decode kernel (decode_mma_kernel.cuh) for KvScheme::kFp8E5m2: one
// file per scheme keeps each compile small and parallel.
#include "kernels/cuda/decode_mma_kernel.cuh"

namespace fp8kv::cuda {
FP8KV_DECODE_MMA_INSTANTIATE(KvScheme::kFp8E5m2)
}  // namespace fp8kv::cuda
