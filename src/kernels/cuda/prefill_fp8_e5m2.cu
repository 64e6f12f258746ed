// The mma.sync prefill kernel's instances for KvScheme::kFp8E5m2: the list
// FP8KV_PREFILL_MMA_FP8_E5M2 of prefill_instances.cuh.
#include "kernels/cuda/prefill_instances.cuh"
#include "kernels/cuda/prefill_kernel.cuh"

namespace fp8kv::cuda::prefill {

FP8KV_PREFILL_MMA_FP8_E5M2(FP8KV_PREFILL_MMA_INSTANTIATE)

}  // namespace fp8kv::cuda::prefill
