// The one table of prefill kernel instances. Every built instance is one entry below; the
// dispatcher's "is it built" predicates (prefill.cu) and the explicit instantiations (one small
// translation unit per list: prefill_<scheme>.cu, prefill_fp8_head_ws*.cu) are generated from
// these lists, so that a new instance is one line here.
#pragma once

#include <cuda_runtime.h>

#include "fp8kv/backend.h"
#include "fp8kv/scheme.h"
#include "kernels/cuda/device_error.h"

// ---- the mma.sync kernel (prefill_kernel.cuh): X(SCHEME, D, WARPS, BLOCK_N) ----
// Every scheme: D 64 and 128 with (8 warps, 64 keys); D 256 with (4, 32). bf16 and fp8-per-head
// also D 128 with (4, 64) (a narrower CTA; not for the schemes that widen K/V in shared memory).
// (fp8-per-head with (8, 128) spilled 212 bytes and ran at 212 TFLOP/s: not built.)
#define FP8KV_PREFILL_MMA_EVERY_SCHEME(X, S) X(S, 64, 8, 64) X(S, 128, 8, 64) X(S, 256, 4, 32)
#define FP8KV_PREFILL_MMA_BF16(X) FP8KV_PREFILL_MMA_EVERY_SCHEME(X, kBf16) X(kBf16, 128, 4, 64)
#define FP8KV_PREFILL_MMA_FP8_PER_TENSOR(X) FP8KV_PREFILL_MMA_EVERY_SCHEME(X, kFp8PerTensor)
#define FP8KV_PREFILL_MMA_FP8_PER_HEAD(X) \
  FP8KV_PREFILL_MMA_EVERY_SCHEME(X, kFp8PerHead) X(kFp8PerHead, 128, 4, 64)
#define FP8KV_PREFILL_MMA_FP8_E5M2(X) FP8KV_PREFILL_MMA_EVERY_SCHEME(X, kFp8E5m2)
#define FP8KV_PREFILL_MMA_FP8_PER_HEAD_BF16Q(X) FP8KV_PREFILL_MMA_EVERY_SCHEME(X, kFp8PerHeadBf16Q)
#define FP8KV_PREFILL_MMA_INSTANCES(X)                                                     \
  FP8KV_PREFILL_MMA_BF16(X) FP8KV_PREFILL_MMA_FP8_PER_TENSOR(X) FP8KV_PREFILL_MMA_FP8_PER_HEAD(X) \
  FP8KV_PREFILL_MMA_FP8_E5M2(X) FP8KV_PREFILL_MMA_FP8_PER_HEAD_BF16Q(X)

// ---- the warp-specialized wgmma kernel (prefill_ws.cuh), fp8-per-head ----
// W(D, PACK_GQA, PING_PONG, SWIZZLE, DIAG); keys per tile and stages follow from D (kWsBlockN,
// kWsStages). Each head dim plain; D 128 also with the 128-byte swizzle (its default: 539 vs 483
// TFLOP/s on the H200), with packed GQA, with packed GQA + ping-pong (both measured no faster:
// kept as benchmark options), and the two benchmark diagnostics (DIAG 1, 2).
#define FP8KV_PREFILL_WS_D128(W)                                                                   \
  W(128, false, false, false, 0) W(128, true, false, false, 0) W(128, true, true, false, 0)       \
  W(128, false, false, true, 0) W(128, false, false, false, 1) W(128, false, false, false, 2)
#define FP8KV_PREFILL_WS_D64_D256(W) W(64, false, false, false, 0) W(256, false, false, false, 0)
#define FP8KV_PREFILL_WS_INSTANCES(W) FP8KV_PREFILL_WS_D128(W) FP8KV_PREFILL_WS_D64_D256(W)

namespace fp8kv::cuda::prefill {

// Defined in prefill_kernel.cuh; instantiated for the entries of FP8KV_PREFILL_MMA_INSTANCES.
template <KvScheme S, int D, int kWarps, int kBlockN>
void launch_prefill(const AttentionParams& a, cudaStream_t stream, DeviceError* error);

#define FP8KV_PREFILL_MMA_MATCH(s, d, w, n) \
  || (S == KvScheme::s && D == (d) && kWarps == (w) && kBlockN == (n))
template <KvScheme S, int D, int kWarps, int kBlockN>
constexpr bool kPrefillBuilt = false FP8KV_PREFILL_MMA_INSTANCES(FP8KV_PREFILL_MMA_MATCH);
#undef FP8KV_PREFILL_MMA_MATCH

// Defined in prefill_ws.cuh; instantiated for the entries of FP8KV_PREFILL_WS_INSTANCES.
template <int D, int kBlockN, int kStages, bool kPackGqa, bool kPingPong, bool kSwizzle, int kDiag>
void launch_prefill_ws(const AttentionParams& a, cudaStream_t stream, DeviceError* error);
template <int D>
constexpr int kWsBlockN = D == 256 ? 64 : 128;  // keys per tile
template <int D>
constexpr int kWsStages = D == 256 ? 3 : 4;     // 4 stages of D = 256 do not fit

#define FP8KV_PREFILL_WS_MATCH(d, pk, pp, sw, dg) \
  || (D == (d) && kPackGqa == (pk) && kPingPong == (pp) && kSwizzle == (sw) && kDiag == (dg))
template <int D, bool kPackGqa, bool kPingPong, bool kSwizzle, int kDiag>
constexpr bool kWsBuilt = false FP8KV_PREFILL_WS_INSTANCES(FP8KV_PREFILL_WS_MATCH);
#undef FP8KV_PREFILL_WS_MATCH

}  // namespace fp8kv::cuda::prefill

// Explicit instantiations, for the instance files.
#define FP8KV_PREFILL_MMA_INSTANTIATE(s, d, w, n) \
  template void launch_prefill<KvScheme::s, d, w, n>(const AttentionParams&, cudaStream_t, DeviceError*);
#define FP8KV_PREFILL_WS_INSTANTIATE(d, pk, pp, sw, dg)                                     \
  template void launch_prefill_ws<d, kWsBlockN<d>, kWsStages<d>, pk, pp, sw, dg>(           \
      const AttentionParams&, cudaStream_t, DeviceError*);
