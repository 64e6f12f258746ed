// Explicit instances of the warp-specialized fp8-per-head prefill kernel, D = 64 and 256 (list:
// prefill_instances.cuh).
#include "kernels/cuda/prefill_instances.cuh"
#include "kernels/cuda/prefill_ws.cuh"

namespace fp8kv::cuda::prefill {

template void launch_prefill_ws<64, 128, 4, false, false, false, 0>(const AttentionParams&, cudaStream_t);
template void launch_prefill_ws<64, 128, 4, true, false, false, 0>(const AttentionParams&, cudaStream_t);
template void launch_prefill_ws<64, 128, 4, true, true, false, 0>(const AttentionParams&, cudaStream_t);
template void launch_prefill_ws<256, 64, 3, false, false, false, 0>(const AttentionParams&, cudaStream_t);
template void launch_prefill_ws<256, 64, 3, true, false, false, 0>(const AttentionParams&, cudaStream_t);
template void launch_prefill_ws<256, 64, 3, true, true, false, 0>(const AttentionParams&, cudaStream_t);

}  // namespace fp8kv::cuda::prefill
