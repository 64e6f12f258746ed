// Explicit instances of the warp-specialized fp8-per-head prefill kernel (list:
// prefill_instances.cuh).
#include "kernels/cuda/prefill_instances.cuh"
#include "kernels/cuda/prefill_ws.cuh"

namespace fp8kv::cuda::prefill {

template void launch_prefill_ws<64, 128, 3>(const AttentionParams&, cudaStream_t);
template void launch_prefill_ws<128, 128, 3>(const AttentionParams&, cudaStream_t);
template void launch_prefill_ws<256, 64, 3>(const AttentionParams&, cudaStream_t);

}  // namespace fp8kv::cuda::prefill
