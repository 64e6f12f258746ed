// Explicit instances of the prefill kernel for KvScheme::kFp8PerHead (list: prefill_instances.cuh).
#include "kernels/cuda/prefill_instances.cuh"
#include "kernels/cuda/prefill_kernel.cuh"

namespace fp8kv::cuda::prefill {

template void launch_prefill<KvScheme::kFp8PerHead, 64, 8, 64>(const AttentionParams&, cudaStream_t,
                                                               DeviceError*);
template void launch_prefill<KvScheme::kFp8PerHead, 128, 8, 64>(const AttentionParams&,
                                                                cudaStream_t, DeviceError*);
template void launch_prefill<KvScheme::kFp8PerHead, 256, 4, 32>(const AttentionParams&,
                                                                cudaStream_t, DeviceError*);
template void launch_prefill<KvScheme::kFp8PerHead, 128, 4, 64>(const AttentionParams&,
                                                                cudaStream_t, DeviceError*);

}  // namespace fp8kv::cuda::prefill
