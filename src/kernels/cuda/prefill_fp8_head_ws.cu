// Explicit instances of the warp-specialized fp8-per-head prefill kernel, D = 128 (list:
// prefill_instances.cuh); D = 64 and 256 in prefill_fp8_head_ws_64_256.cu.
#include "kernels/cuda/prefill_instances.cuh"
#include "kernels/cuda/prefill_ws.cuh"

namespace fp8kv::cuda::prefill {

template void launch_prefill_ws<128, 128, 4, false, false, false, 0>(const AttentionParams&, cudaStream_t);
template void launch_prefill_ws<128, 128, 4, true, false, false, 0>(const AttentionParams&, cudaStream_t);
template void launch_prefill_ws<128, 128, 4, true, true, false, 0>(const AttentionParams&, cudaStream_t);
template void launch_prefill_ws<128, 128, 4, false, false, true, 0>(const AttentionParams&, cudaStream_t);
template void launch_prefill_ws<128, 128, 4, false, false, false, 1>(const AttentionParams&, cudaStream_t);
template void launch_prefill_ws<128, 128, 4, false, false, false, 2>(const AttentionParams&, cudaStream_t);

}  // namespace fp8kv::cuda::prefill
