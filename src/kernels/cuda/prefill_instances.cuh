// The prefill kernel instances that are built: one list shared by the dispatcher (prefill.cu) and
// the explicit instantiations (prefill_bf16.cu, prefill_fp8_tensor.cu, prefill_fp8_head.cu,
// prefill_fp8_e5m2.cu, prefill_fp8_head_bf16q.cu), so that each instance compiles once, in its own
// small translation unit.
#pragma once

#include <cuda_runtime.h>

#include "fp8kv/backend.h"
#include "fp8kv/scheme.h"

namespace fp8kv::cuda::prefill {

// Defined in prefill_kernel.cuh; instantiated only for the shapes below.
template <KvScheme S, int D, int kWarps, int kBlockN>
void launch_prefill(const AttentionParams& a, cudaStream_t stream);

// Built (kWarps, kBlockN) per scheme and head_dim:
//   every scheme:        D 64 and 128 with (8, 64); D 256 with (4, 32)
//   bf16, fp8-per-head:  D 128 with (4, 64) (not the widening schemes: fp8-per-tensor,
//                        fp8-e5m2, fp8-per-head-bf16q)
// (fp8-per-head with (8, 128) spilled 212 bytes and ran at 212 TFLOP/s: not built.)
template <KvScheme S, int D, int kWarps, int kBlockN>
constexpr bool kPrefillBuilt =
    (D <= 128 && kWarps == 8 && kBlockN == 64) || (D == 256 && kWarps == 4 && kBlockN == 32) ||
    ((S == KvScheme::kBf16 || S == KvScheme::kFp8PerHead) && D == 128 && kWarps == 4 &&
     kBlockN == 64);

// fp8-per-head, warp-specialized (prefill_ws.cuh, instantiated in prefill_fp8_head_ws*.cu):
// kBlockN 128 (64 for D = 256), kStages 4 (3 for D = 256: 4 do not fit), each head dim with the
// options (kPackGqa, kPingPong) in (false, false), (true, false), (true, true); D = 128 also with
// kSwizzle alone; kDiag 1 and 2 (benchmark diagnostics) for D = 128 without options.
template <int D, int kBlockN, int kStages, bool kPackGqa, bool kPingPong, bool kSwizzle, int kDiag>
void launch_prefill_ws(const AttentionParams& a, cudaStream_t stream);
template <int D>
constexpr int kWsBlockN = D == 256 ? 64 : 128;
template <int D>
constexpr int kWsStages = D == 256 ? 3 : 4;

}  // namespace fp8kv::cuda::prefill
