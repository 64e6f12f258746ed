// The mma.sync prefill kernel's instances for KvScheme::kBf16: the list FP8KV_PREFILL_MMA_BF16 of
// prefill_instances.cuh.
#include "kernels/cuda/prefill_instances.cuh"
#include "kernels/cuda/prefill_kernel.cuh"

namespace fp8kv::cuda::prefill {

FP8KV_PREFILL_MMA_BF16(FP8KV_PREFILL_MMA_INSTANTIATE)

}  // namespace fp8kv::cuda::prefill
