// Prefill attention dispatch: runtime scheme, head_dim and tile configuration -> a built kernel
// instance (the table: prefill_instances.cuh) of the one prefill kernel, prefill_ws.cuh
// (warp-specialized wgmma: e4m3 operands for fp8-per-head, 16-bit ones for the others); its
// parts, named apart: prefill_common.cuh.
#include <string>

#include "fp8kv/error.h"
#include "kernels/cuda/dispatch.h"
#include "kernels/cuda/launchers.h"
#include "kernels/cuda/prefill_instances.cuh"
#include "kernels/cuda/prefill_launch.cuh"

namespace fp8kv::cuda {

const char* prefill_config_name(PrefillConfig config) {
  switch (config) {
    case PrefillConfig::kDefault:
      return "default";
    case PrefillConfig::kWarpSpecialized:
      return "ws";
    case PrefillConfig::kWsSwizzle:
      return "ws-sw128";
    case PrefillConfig::kWsPersistent:
      return "ws-persistent";
    case PrefillConfig::kWsDiagConsumers:
      return "ws-diag-consumers";
    case PrefillConfig::kWsDiagProducer:
      return "ws-diag-producer";
  }
  return "unknown";
}

namespace {

// The warp-specialized kernel (prefill_ws.cuh): fp8-per-head with e4m3 operands, the bf16-Q
// schemes with 16-bit ones (no diagnostics built for those; item-loop instances for the widened
// schemes' swizzled kernels); kDiag: benchmark diagnostics; kItemLoop: persistent CTAs.
template <KvScheme S, int D, bool kSwizzle = false, int kDiag = 0, bool kItemLoop = false>
bool try_launch_ws(const AttentionParams& p, cudaStream_t stream, DeviceError* error) {
  if constexpr (S == KvScheme::kFp8PerHead && prefill::kWsBuilt<D, kSwizzle, kDiag, kItemLoop>) {
    prefill::launch_prefill_ws<S, D, prefill::kWsBlockN<S, D>, prefill::kWsStages<S, D>, kSwizzle,
                               kDiag, kItemLoop>(p, stream, error);
    return true;
  } else if constexpr (!fp8_q(S) && kDiag == 0 &&
                       prefill::kWsBf16QBuilt<S, D, kSwizzle, kItemLoop>) {
    prefill::launch_prefill_ws<S, D, prefill::kWsBlockN<S, D>, prefill::kWsStages<S, D>, kSwizzle,
                               0, kItemLoop>(p, stream, error);
    return true;
  } else {
    return false;
  }
}

// fp8-per-head's persistent CTAs pay where a batch's items are short: even batches (the same new
// tokens in every request: prefill_item_grid's condition, which launches them persistent while
// kPrefillPersistentCtas is on) whose requests see at most this many keys. H200, the persistent
// instance against the one-item kernel, in one call: D 128 B=16 L=1024 344 -> 406 TFLOP/s, B=4
// L=4096 603 -> 624, B=2 L=8192 698 -> 685, B=1 L=16384 734 -> 693; D 64 B=2 L=8192 458 -> 470
// (D 256: 647 -> 587, not built). docs/GPU.md, seventeenth session. Since the softmax's fp32
// exponentials (twenty-first session) the persistent instance also wins at 8192 keys: B=2 L=8192
// 714-721 -> 746-749 TFLOP/s over three calls, GQA 7 715-718 -> 745; B=1 L=16384 and 32768 within
// the calls' spread (733 -> 756, 761 -> 753), so longer requests keep one CTA per item.
constexpr int kFp8PersistentMaxKeysD128 = 8192;
constexpr int kFp8PersistentMaxKeysD64 = 8192;
inline bool fp8_persistent_pays(const AttentionParams& p, int head_dim) {
  const int max_keys = head_dim == 64    ? kFp8PersistentMaxKeysD64
                       : head_dim == 128 ? kFp8PersistentMaxKeysD128
                                         : 0;
  return even_batch(p) && p.batch.max_seq_len <= max_keys;
}

template <KvScheme S, int D>
void launch_with_config(const AttentionParams& p, PrefillConfig config, cudaStream_t stream,
                        DeviceError* error) {
  if (config == PrefillConfig::kDefault) {
    if (S == KvScheme::kFp8PerHead) {
      // Measured on the H200: the swizzled layout 539 vs 483 TFLOP/s (causal B2 L8192 D128).
      config = fp8_persistent_pays(p, D) ? PrefillConfig::kWsPersistent
               : D == 128                ? PrefillConfig::kWsSwizzle
                                         : PrefillConfig::kWarpSpecialized;
    } else if constexpr (prefill::kWsQSplit<S, D>) {
      // fp8-per-tensor at D 128 runs on e4m3 operands (its Q split in two, prefill_ws.cuh): the
      // persistent instance where fp8-per-head's pays and the mask is causal. H200, in one call
      // (sixty-fifth session), persistent against one CTA per item: causal B=2 L=8192 647 / 647
      // TFLOP/s, B=4 L=4096 542 / 520, B=16 L=1024 338 / 295; non-causal B=2 L=8192 591 / 610,
      // and the uneven cached-prefix batch 450 / 470 (one CTA per item either way).
      config = fp8_persistent_pays(p, D) && p.causal ? PrefillConfig::kWsPersistent
                                                     : PrefillConfig::kWsSwizzle;
    } else {
      // The bf16-Q schemes: 16-bit operands, swizzled (H200, causal B2 L8192): bf16 500 vs 268
      // TFLOP/s for the retired mma.sync kernel at D 128, 357 vs 220 at D 64, 406 vs 248 at D 256;
      // FP8 K/V widened at D 256 267 vs 199. FP8 K/V widened at D 128: the swizzled instance is 128
      // keys x 2 stages with the raw rows in a ring of their own (WsShape::kRawRing): 487 vs 447
      // for the plain 64 x 4 (eighteenth session; 441 vs 400 at B=4 L=4096, 406 vs 372 for the
      // cached prefix); at D 64, 362.5 vs 356.8 (the plain layout had measured ahead before the
      // widening's rework: 342 vs 336). The widened instances as persistent CTAs (even batches;
      // one CTA per item otherwise), against the one-item kernel in one call (nineteenth
      // session; the item loop's producer at 96 registers, the consumers at 200): fp8-per-tensor
      // causal 504 -> 552, non-causal 528 -> 574, B=16 L=1024 284 -> 329, B=4 L=4096 452 -> 501,
      // B=1 L=16384 537 -> 584, the cached prefix (uneven: one CTA per item either way) 387 ->
      // 407; D 64 362 -> 384. D 256 takes one CTA per item: on 48-key tiles 510 against 493 for
      // the persistent instance (twentieth session; on 32-key tiles it had been 431 against 443),
      // which is retired.
      const bool widened = kv_codec(S) != KvCodec::kBf16;
      config = widened && D <= 128 ? PrefillConfig::kWsPersistent : PrefillConfig::kWsSwizzle;
    }
  }
  bool launched = false;
  switch (config) {
    case PrefillConfig::kWarpSpecialized:
      launched = try_launch_ws<S, D>(p, stream, error);
      break;
    case PrefillConfig::kWsSwizzle:
      launched = try_launch_ws<S, D, true>(p, stream, error);
      break;
    case PrefillConfig::kWsPersistent: {  // e4m3: D 128 swizzled, D 64 plain; widened: swizzled
      constexpr bool kSwizzled = !fp8_q(S) || D == 128;
      launched = try_launch_ws<S, D, kSwizzled, 0, true>(p, stream, error);
      break;
    }
    case PrefillConfig::kWsDiagConsumers:
      launched = try_launch_ws<S, D, false, 1>(p, stream, error);
      break;
    case PrefillConfig::kWsDiagProducer:
      launched = try_launch_ws<S, D, false, 2>(p, stream, error);
      break;
    default:
      break;
  }
  if (!launched) {
    throw Error(std::string("prefill_attention: tile config '") + prefill_config_name(config) +
                "' is not built for scheme " + scheme_name(S) + " and head_dim " +
                std::to_string(D));
  }
}

}  // namespace

#ifdef FP8KV_PREFILL_TIMELINE
namespace {
uint32_t* g_prefill_timeline = nullptr;
}  // namespace
void set_prefill_timeline(uint32_t* buffer) { g_prefill_timeline = buffer; }
namespace prefill {
uint32_t* prefill_timeline() { return g_prefill_timeline; }
}  // namespace prefill
#endif

void launch_prefill_attention(const AttentionParams& p, PrefillConfig config, cudaStream_t stream,
                              DeviceError* error) {
  FP8KV_DISPATCH_SCHEME(p.cache.scheme, kScheme, [&] {
    FP8KV_DISPATCH_HEAD_DIM(p.cache.head_dim, kHeadDim, [&] {
      if (p.batch.num_requests == 0 || p.batch.total_q == 0 || p.batch.max_q_len == 0) return;
      launch_with_config<kScheme, kHeadDim>(p, config, stream, error);
    });
  });
}

void launch_prefill_attention(const AttentionParams& p, cudaStream_t stream, DeviceError* error) {
  launch_prefill_attention(p, PrefillConfig::kDefault, stream, error);
}

}  // namespace fp8kv::cuda
