// The warp-specialized prefill kernel's instances for KvScheme::kFp8PerTensor (f16 operands; e4m3
// ones at D 128, its Q split in two: WsShape::kQSplit):
// the list FP8KV_PREFILL_WS_FP8_PER_TENSOR of prefill_instances.cuh.
#include "kernels/cuda/prefill_instances.cuh"
#include "kernels/cuda/prefill_ws.cuh"

namespace fp8kv::cuda::prefill {

FP8KV_PREFILL_WS_FP8_PER_TENSOR(FP8KV_PREFILL_WS_BF16Q_INSTANTIATE)

}  // namespace fp8kv::cuda::prefill
