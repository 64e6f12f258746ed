// Explicit instances of the prefill kernel for KvScheme::kFp8E5m2 (list: prefill_instances.cuh).
#include "kernels/cuda/prefill_instances.cuh"
#include "kernels/cuda/prefill_kernel.cuh"

namespace fp8kv::cuda::prefill {

template void launch_prefill<KvScheme::kFp8E5m2, 64, 8, 64>(const AttentionParams&, cudaStream_t);
template void launch_prefill<KvScheme::kFp8E5m2, 128, 8, 64>(const AttentionParams&, cudaStream_t);
template void launch_prefill<KvScheme::kFp8E5m2, 256, 4, 32>(const AttentionParams&, cudaStream_t);

}  // namespace fp8kv::cuda::prefill
