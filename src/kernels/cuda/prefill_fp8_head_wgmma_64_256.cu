// Explicit instances of the wgmma fp8-per-head prefill kernel, D = 64 and 256
// (list: prefill_instances.cuh).
#include "kernels/cuda/prefill_instances.cuh"
#include "kernels/cuda/prefill_wgmma.cuh"

namespace fp8kv::cuda::prefill {

template void launch_prefill_wgmma<64, 128, 2, 1>(const AttentionParams&, cudaStream_t,
                                                  DeviceError*);
template void launch_prefill_wgmma<256, 64, 2, 1>(const AttentionParams&, cudaStream_t,
                                                  DeviceError*);

}  // namespace fp8kv::cuda::prefill
