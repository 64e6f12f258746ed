// The prefill kernel instances that are built: one list shared by the dispatcher (prefill.cu) and
// the explicit instantiations (prefill_bf16.cu, prefill_fp8_tensor.cu, prefill_fp8_head.cu), so
// that each instance compiles once, in its own small translation unit.
#pragma once

#include <cuda_runtime.h>

#include "fp8kv/backend.h"
#include "fp8kv/scheme.h"
#include "kernels/cuda/device_error.h"

namespace fp8kv::cuda::prefill {

// Defined in prefill_kernel.cuh; instantiated only for the shapes below.
template <KvScheme S, int D, int kWarps, int kBlockN>
void launch_prefill(const AttentionParams& a, cudaStream_t stream, DeviceError* error);

// Built (kWarps, kBlockN) per scheme and head_dim:
//   every scheme:        D 64 and 128 with (8, 64); D 256 with (4, 32)
//   bf16, fp8-per-head:  D 128 with (4, 64)
// (fp8-per-head with (8, 128) spilled 212 bytes and ran at 212 TFLOP/s: not built.)
template <KvScheme S, int D, int kWarps, int kBlockN>
constexpr bool kPrefillBuilt =
    (D <= 128 && kWarps == 8 && kBlockN == 64) || (D == 256 && kWarps == 4 && kBlockN == 32) ||
    (S != KvScheme::kFp8PerTensor && D == 128 && kWarps == 4 && kBlockN == 64);

// fp8-per-head on wgmma (prefill_wgmma.cuh, instantiated in prefill_fp8_head_wgmma*.cu):
// (D, kBlockN, kWarpgroups, kMinBlocks) in (64, 128, 2, 1), (128, 128, 2, 1), (128, 64, 2, 1),
// (256, 64, 2, 1). One warpgroup per CTA with 2-3 CTAs per SM, (128, 128, 1, 2) and
// (128, 64, 1, 3), was measured slower on H100 (319 and 340 vs 379 TFLOP/s on the benchmark
// shape: each CTA loads and transposes the whole K/V tile for half the rows) and is not built.
template <int D, int kBlockN, int kWarpgroups, int kMinBlocks>
void launch_prefill_wgmma(const AttentionParams& a, cudaStream_t stream, DeviceError* error);
template <int D, int kBlockN, int kWarpgroups, int kMinBlocks>
constexpr bool kWgmmaBuilt = kWarpgroups == 2 && kMinBlocks == 1 &&
                             (kBlockN == (D == 256 ? 64 : 128) || (D == 128 && kBlockN == 64));

}  // namespace fp8kv::cuda::prefill
