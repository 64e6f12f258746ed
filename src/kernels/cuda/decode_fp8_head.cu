// Explicit instantiations of the decode kernels for KvScheme::kFp8PerHead: the CUDA-core kernel and the
// tensor-core kernel (one file per scheme keeps each compile small and parallel).
#include "kernels/cuda/decode_kernel.cuh"
#include "kernels/cuda/decode_mma_kernel.cuh"

namespace fp8kv::cuda {
FP8KV_DECODE_INSTANTIATE(KvScheme::kFp8PerHead)
FP8KV_DECODE_MMA_INSTANTIATE(KvScheme::kFp8PerHead)
}  // namespace fp8kv::cuda
