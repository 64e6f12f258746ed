// The warp-specialized prefill kernel's instances for KvScheme::kFp8PerHeadBf16Q (f16 operands):
// the list FP8KV_PREFILL_WS_FP8_PER_HEAD_BF16Q of prefill_instances.cuh.
#include "kernels/cuda/prefill_instances.cuh"
#include "kernels/cuda/prefill_ws.cuh"

namespace fp8kv::cuda::prefill {

FP8KV_PREFILL_WS_FP8_PER_HEAD_BF16Q(FP8KV_PREFILL_WS_BF16Q_INSTANTIATE)

}  // namespace fp8kv::cuda::prefill
