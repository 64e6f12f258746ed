// The warp-specialized fp8-per-head prefill kernel's instances, D = 128: the list
// FP8KV_PREFILL_WS_D128 of prefill_instances.cuh.
#include "kernels/cuda/prefill_instances.cuh"
#include "kernels/cuda/prefill_ws.cuh"

namespace fp8kv::cuda::prefill {

FP8KV_PREFILL_WS_D128(FP8KV_PREFILL_WS_INSTANTIATE)

}  // namespace fp8kv::cuda::prefill
