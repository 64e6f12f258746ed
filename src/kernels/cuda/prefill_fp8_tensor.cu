// The mma.sync prefill kernel's instances for KvScheme::kFp8PerTensor: the list
// FP8KV_PREFILL_MMA_FP8_PER_TENSOR of prefill_instances.cuh.
#include "kernels/cuda/prefill_instances.cuh"
#include "kernels/cuda/prefill_kernel.cuh"

namespace fp8kv::cuda::prefill {

FP8KV_PREFILL_MMA_FP8_PER_TENSOR(FP8KV_PREFILL_MMA_INSTANTIATE)

}  // namespace fp8kv::cuda::prefill
