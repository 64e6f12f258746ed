// The one table of prefill kernel instances. Every built instance is one entry below; the
// dispatcher's "is it built" predicates (prefill.cu) and the explicit instantiations (one small
// translation unit per list: prefill_<scheme>_ws.cu, prefill_fp8_head_ws*.cu) are generated from
// these lists, so that a new instance is one line here. Every instance is of the one prefill
// kernel, the warp-specialized wgmma kernel of prefill_ws.cuh (the mma.sync kernel it replaced
// is retired, issue 10: the CPU twin is the oracle).
#pragma once

#include <cuda_runtime.h>

#include "fp8kv/backend.h"
#include "fp8kv/scheme.h"
#include "kernels/cuda/device_error.h"

// The tables keep one instance or list per line.
// clang-format off
// ---- the warp-specialized wgmma kernel (prefill_ws.cuh), fp8-per-head ----
// W(D, SWIZZLE, DIAG, ITEM_LOOP); keys per tile and stages follow from D (kWsBlockN, kWsStages).
// Each head dim plain; D 128 also with the 128-byte swizzle (its default: 539 vs 483 TFLOP/s on
// the H200) and the two benchmark diagnostics (DIAG 1, 2); the defaults of D 64 and 128 also as
// persistent CTAs (ITEM_LOOP: PrefillConfig::kWsPersistent, for even batches of short requests).
// (Packed GQA and ping-pong, never faster, are retired: docs/GPU.md, "Warp-specialized FP8
// prefill".)
#define FP8KV_PREFILL_WS_D128(W) \
  W(128, false, 0, false)        \
  W(128, true, 0, false)         \
  W(128, true, 0, true)          \
  W(128, false, 1, false)        \
  W(128, false, 2, false)
#define FP8KV_PREFILL_WS_D64_D256(W) \
  W(64, false, 0, false)             \
  W(64, false, 0, true)              \
  W(256, false, 0, false)
#define FP8KV_PREFILL_WS_INSTANCES(W) FP8KV_PREFILL_WS_D128(W) FP8KV_PREFILL_WS_D64_D256(W)

// ---- the same kernel with 16-bit operands, for the bf16-Q schemes: B(SCHEME, D, SWIZZLE, LOOP)
// (fp8-per-tensor's D 128 entries run on e4m3 operands, its Q split in two: kWsQSplit below)
// PrefillConfig::kWsSwizzle for D 64, 128 and 256 (16-bit operands are always swizzled: the
// plain-layout instances, config `ws`, lost to these at every head dim and are retired, issue
// 10: docs/GPU.md, fifty-second session). The widened schemes' instances at D 64 and 128 also as
// persistent CTAs (LOOP: PrefillConfig::kWsPersistent, their default there: prefill.cu; at D
// 256, on 48-key tiles, one CTA per item measured faster and the persistent instance is retired);
// bf16's instances are persistent as they are (kSplitKv), and its default is kWsSwizzle.
#define FP8KV_PREFILL_WS_BF16Q_EVERY_D(B, S) \
  B(S, 64, true, false)                      \
  B(S, 128, true, false)                     \
  B(S, 256, true, false)
#define FP8KV_PREFILL_WS_WIDENED(B, S) \
  FP8KV_PREFILL_WS_BF16Q_EVERY_D(B, S) \
  B(S, 64, true, true)                 \
  B(S, 128, true, true)
#define FP8KV_PREFILL_WS_BF16(B) FP8KV_PREFILL_WS_BF16Q_EVERY_D(B, kBf16)
#define FP8KV_PREFILL_WS_FP8_PER_TENSOR(B) FP8KV_PREFILL_WS_WIDENED(B, kFp8PerTensor)
#define FP8KV_PREFILL_WS_FP8_E5M2(B) FP8KV_PREFILL_WS_WIDENED(B, kFp8E5m2)
#define FP8KV_PREFILL_WS_FP8_PER_HEAD_BF16Q(B) FP8KV_PREFILL_WS_WIDENED(B, kFp8PerHeadBf16Q)
#define FP8KV_PREFILL_WS_BF16Q_INSTANCES(B) \
  FP8KV_PREFILL_WS_BF16(B)                  \
  FP8KV_PREFILL_WS_FP8_PER_TENSOR(B)        \
  FP8KV_PREFILL_WS_FP8_E5M2(B)              \
  FP8KV_PREFILL_WS_FP8_PER_HEAD_BF16Q(B)
// clang-format on

namespace fp8kv::cuda::prefill {

// Defined in prefill_ws.cuh; instantiated for the entries of FP8KV_PREFILL_WS_INSTANCES
// (fp8-per-head) and FP8KV_PREFILL_WS_BF16Q_INSTANCES.
template <KvScheme S, int D, int kBlockN, int kStages, bool kSwizzle, int kDiag, bool kItemLoop>
void launch_prefill_ws(const AttentionParams& a, cudaStream_t stream, DeviceError* error);
// Keys per tile and ring stages. A CTA (one per SM) holds Q (128 rows) and kStages x (K + V
// operand tiles + the raw fp8 rows the producer transposes or widens) within 227 KB; the ring
// needs >= 3 stages, or 2 where K and V are published and released apart. The bf16-operand
// choices take as many stages as fit:
//   e4m3 (fp8-per-head)   D 64, 128: 128 keys x 4 stages; D 256: 64 x 3 (4 do not fit)
//   bf16 K/V (bf16)       D 64: 192 x 4 (208 KB: 395 -> 408 TFLOP/s against 128 x 6, H200,
//                         causal B=2 L=8192); D 128: 128 x 3 (224 KB; 160 x 2 measured even,
//                         slower on short requests); D 256: 64 x 2 (192 KB; K and V apart,
//                         kSplitKv: 495 -> 631 TFLOP/s against 32 x 5, whose 32-key tiles paid a
//                         tile's fixed work per 32 keys)
//   widened e4m3 / e5m2   D 64: 128 x 4; D 128: 128 x 2 with the raw rows in a ring of their own
//                         (WsShape::kRawRing; 128 x 3 does not fit with the staging, the retired
//                         plain layout took 64 x 4); D 256: 48 x 2, the raw rows in a ring of
//                         their own (H200, fp8-per-tensor causal B=2 L=8192: 431 -> 510 TFLOP/s
//                         against 32 x 4; the persistent instance 443 -> 493, so retired)
// (The 16-bit operands are swizzled in every instance; fp8-per-head's tile does not depend on
// its layout.)
// A bf16-Q scheme whose prefill rounds P to e4m3 (fp8_p, scheme.h: fp8-per-tensor at D 128) runs
// on e4m3 operands, its bf16 Q split into two e4m3 parts (WsShape::kQSplit, prefill_ws.cuh): its
// tiles and stages are fp8-per-head's.
template <KvScheme S, int D>
constexpr bool kWsQSplit = fp8_p(S, /*prefill=*/true, D) && !fp8_q(S);
template <KvScheme S, int D>
constexpr int kWsBlockN = fp8_q(S) || kWsQSplit<S, D> ? (D == 256 ? 64 : 128)
                          : D == 256                  ? (kv_codec(S) == KvCodec::kBf16 ? 64 : 48)
                          : (kv_codec(S) == KvCodec::kBf16 && D == 64) ? 192
                                                                       : 128;
template <KvScheme S, int D>
constexpr int kWsStages = fp8_q(S) || kWsQSplit<S, D>     ? (D == 256 ? 3 : 4)
                          : kv_codec(S) == KvCodec::kBf16 ? (D == 64    ? 4
                                                             : D == 128 ? 3
                                                                        : 2)
                          : D == 64                       ? 4
                                                          : 2;

#define FP8KV_PREFILL_WS_MATCH(d, sw, dg, lp) \
  || (D == (d) && kSwizzle == (sw) && kDiag == (dg) && kItemLoop == (lp))
template <int D, bool kSwizzle, int kDiag, bool kItemLoop>
constexpr bool kWsBuilt = false FP8KV_PREFILL_WS_INSTANCES(FP8KV_PREFILL_WS_MATCH);
#undef FP8KV_PREFILL_WS_MATCH
#define FP8KV_PREFILL_WS_BF16Q_MATCH(s, d, sw, lp) \
  || (S == KvScheme::s && D == (d) && kSwizzle == (sw) && kItemLoop == (lp))
template <KvScheme S, int D, bool kSwizzle, bool kItemLoop>
constexpr bool kWsBf16QBuilt = false FP8KV_PREFILL_WS_BF16Q_INSTANCES(FP8KV_PREFILL_WS_BF16Q_MATCH);
#undef FP8KV_PREFILL_WS_BF16Q_MATCH

}  // namespace fp8kv::cuda::prefill

// Explicit instantiations, for the instance files.
#define FP8KV_PREFILL_WS_INSTANTIATE(d, sw, dg, lp)                                              \
  template void launch_prefill_ws<KvScheme::kFp8PerHead, d, kWsBlockN<KvScheme::kFp8PerHead, d>, \
                                  kWsStages<KvScheme::kFp8PerHead, d>, sw, dg, lp>(              \
      const AttentionParams&, cudaStream_t, DeviceError*);
#define FP8KV_PREFILL_WS_BF16Q_INSTANTIATE(s, d, sw, lp)                     \
  template void launch_prefill_ws<KvScheme::s, d, kWsBlockN<KvScheme::s, d>, \
                                  kWsStages<KvScheme::s, d>, sw, 0, lp>(     \
      const AttentionParams&, cudaStream_t, DeviceError*);
