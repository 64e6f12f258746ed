// Explicit instances of the prefill kernel for KvScheme::kFp8PerHeadBf16Q (list: prefill_instances.cuh).
#include "kernels/cuda/prefill_instances.cuh"
#include "kernels/cuda/prefill_kernel.cuh"

namespace fp8kv::cuda::prefill {

template void launch_prefill<KvScheme::kFp8PerHeadBf16Q, 64, 8, 64>(const AttentionParams&, cudaStream_t);
template void launch_prefill<KvScheme::kFp8PerHeadBf16Q, 128, 8, 64>(const AttentionParams&, cudaStream_t);
template void launch_prefill<KvScheme::kFp8PerHeadBf16Q, 256, 4, 32>(const AttentionParams&, cudaStream_t);

}  // namespace fp8kv::cuda::prefill
