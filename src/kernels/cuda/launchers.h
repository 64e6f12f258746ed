// Host-side launchers of the CUDA kernels, one per kernel family, called by the CUDA backend
// (cuda_backend.cpp) after it validated the arguments. Each enqueues work on `stream` and
// returns without synchronizing.
#pragma once

#include <cuda_runtime.h>

#include "fp8kv/backend.h"
#include "kernels/cuda/device_error.h"

namespace fp8kv::cuda {

// quantize.cu
void launch_quantize_kv(const QuantizeKvParams& p, cudaStream_t stream);
void launch_quantize_q(const QuantizeQParams& p, cudaStream_t stream);
// Attention reads req_to_token's row b_req_idx[b] of each request b only when it lies in
// [0, batch.max_requests): a request out of range is skipped (its rows of o are left undefined) and
// recorded in `error` (device memory, device_error.h) when given.
// decode.cu; `workspace` (decode_workspace_bytes) holds the counters of the split-KV merge (its
// first kDecodeSplitCounters uint32s: groups, then sub-groups, decode_split.h) and the partial
// results. The counters
// must be zero before the first launch: clear_decode_workspace
// once when the workspace is allocated (not per launch); every launch leaves the counters zero,
// so a workspace serves any later shape and CUDA graph replays as it is.
size_t decode_workspace_bytes(const AttentionParams& p);
void clear_decode_workspace(void* workspace, size_t bytes, cudaStream_t stream);
// The launch configuration decode_attention picks for p's shapes (Backend::decode_launch_key).
uint64_t decode_launch_key(const AttentionParams& p);
void launch_decode_attention(const AttentionParams& p, void* workspace, cudaStream_t stream,
                             DeviceError* error = nullptr);
// prefill*.cu
void launch_prefill_attention(const AttentionParams& p, cudaStream_t stream,
                              DeviceError* error = nullptr);

}  // namespace fp8kv::cuda
