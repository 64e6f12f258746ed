// Explicit instances of the prefill kernel for KvScheme::kBf16 (list: prefill_instances.cuh).
#include "kernels/cuda/prefill_instances.cuh"
#include "kernels/cuda/prefill_kernel.cuh"

namespace fp8kv::cuda::prefill {

template void launch_prefill<KvScheme::kBf16, 64, 8, 64>(const AttentionParams&, cudaStream_t,
                                                         DeviceError*);
template void launch_prefill<KvScheme::kBf16, 128, 8, 64>(const AttentionParams&, cudaStream_t,
                                                          DeviceError*);
template void launch_prefill<KvScheme::kBf16, 256, 4, 32>(const AttentionParams&, cudaStream_t,
                                                          DeviceError*);
template void launch_prefill<KvScheme::kBf16, 128, 4, 64>(const AttentionParams&, cudaStream_t,
                                                          DeviceError*);

}  // namespace fp8kv::cuda::prefill
