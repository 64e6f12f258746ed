// The warp-specialized fp8-per-head prefill kernel's instances, D = 64 and 256: the list
// FP8KV_PREFILL_WS_D64_D256 of prefill_instances.cuh.
#include "kernels/cuda/prefill_instances.cuh"
#include "kernels/cuda/prefill_ws.cuh"

namespace fp8kv::cuda::prefill {

FP8KV_PREFILL_WS_D64_D256(FP8KV_PREFILL_WS_INSTANTIATE)

}  // namespace fp8kv::cuda::prefill
