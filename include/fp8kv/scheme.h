// The KV-cache schemes (docs/DESIGN.md, "KV schemes"). A scheme is three choices, each a
// constexpr function below that kernels turn into template constants: how a cache element is
// stored (kv_codec), where K/V scales come from (kv_scale_source), and whether Q (and P) are
// rounded to e4m3 for FP8 tensor-core products (fp8_q; P also where fp8_p says).
#pragma once

#include <string>
#include <vector>

#include "fp8kv/export.h"

namespace fp8kv {

enum class KvScheme {
  kBf16,             // bf16 cache, no scales; also the cache used while calibrating
  kFp8PerTensor,     // e4m3 cache, one K and one V scale per layer; bf16 Q
  kFp8PerHead,       // e4m3 cache, one K and one V scale per (layer, KV head); e4m3 Q
  kFp8E5m2,          // e5m2 cache, no scales (scale 1: the wider exponent covers the range); bf16 Q
  kFp8PerHeadBf16Q,  // e4m3 cache, fp8-per-head's scales; bf16 Q and P, K/V widened in-kernel
};

// How one cache element is stored.
enum class KvCodec { kBf16, kE4m3, kE5m2 };
// Where the K/V scales of a layer come from: none (scale 1), one K and one V scale per layer
// ([1] each), or one per KV head ([Hkv] each).
enum class KvScaleSource { kNone, kPerTensor, kPerHead };

constexpr KvCodec kv_codec(KvScheme s) {
  return s == KvScheme::kBf16      ? KvCodec::kBf16
         : s == KvScheme::kFp8E5m2 ? KvCodec::kE5m2
                                   : KvCodec::kE4m3;
}
constexpr KvScaleSource kv_scale_source(KvScheme s) {
  return s == KvScheme::kFp8PerTensor ? KvScaleSource::kPerTensor
         : (s == KvScheme::kFp8PerHead || s == KvScheme::kFp8PerHeadBf16Q) ? KvScaleSource::kPerHead
                                                                           : KvScaleSource::kNone;
}
// Q quantized to e4m3 per (request, KV head) and P rounded to e4m3: fp8-per-head only.
constexpr bool fp8_q(KvScheme s) { return s == KvScheme::kFp8PerHead; }
// The scale of P where it is rounded to e4m3: 2^8 p, in (0, 256] (below e4m3's 448). e4m3 is
// normal from 2^-6 on, so p keeps its 3 mantissa bits down to 2^-14 (unscaled, every p below
// 2^-10 would round to 0: the diffuse tail of a long row lost while the row sum counts it). The
// row sum is taken over the same scaled p, so the scale cancels in o (FlashAttention-3 does this).
constexpr int kPScaleLog2 = 8;
constexpr float kPScale = static_cast<float>(1 << kPScaleLog2);
// P rounded to e4m3 (times kPScale) for an e4m3 P V product: fp8-per-head (fp8_q) wherever it
// attends, and fp8-per-tensor in prefill at head_dim 128, whose kernel runs on e4m3 operands
// with its bf16 Q split into two e4m3 parts (hi + lo: Q K^T keeps bf16 Q's bits) and multiplies
// P by V as stored (docs/DESIGN.md, "Per-tensor scales with FP8 Q"). Elsewhere P is used as
// computed (the kernels round it to bf16 / f16, within their tests' bounds).
constexpr bool fp8_p(KvScheme s, bool prefill, int head_dim) {
  return fp8_q(s) || (prefill && s == KvScheme::kFp8PerTensor && head_dim == 128);
}
// log2 of the scale P is rounded at: kPScaleLog2 where P goes to e4m3 (fp8_p), else 0.
constexpr int p_scale_log2(bool e4m3_p) { return e4m3_p ? kPScaleLog2 : 0; }

// Every scheme, in the order of the enum (for tests and tables).
constexpr KvScheme kAllSchemes[] = {KvScheme::kBf16, KvScheme::kFp8PerTensor, KvScheme::kFp8PerHead,
                                    KvScheme::kFp8E5m2, KvScheme::kFp8PerHeadBf16Q};

// "bf16", "fp8-per-tensor", "fp8-per-head", "fp8-e5m2", "fp8-per-head-bf16q".
FP8KV_API const char* scheme_name(KvScheme s);
// Accepts the names above (and "per-head"/"per-tensor" for the FP8 schemes); throws Error
// naming the text otherwise.
FP8KV_API KvScheme parse_scheme(const std::string& text);

// "0,31" -> {0, 31}: layer indices for --kv-bf16-layers, in the order given. Throws Error naming
// `option` and the bad entry on anything but comma-separated non-negative integers, and on a
// layer given twice. Whether the layers exist is the pool's check (KvPool).
FP8KV_API std::vector<int> parse_layer_list(const std::string& text, const std::string& option);

// An FP8 cache (one byte per element, e4m3 or e5m2).
constexpr bool is_fp8(KvScheme s) { return s != KvScheme::kBf16; }
// The scheme takes K/V scales, and so a calibration file (fp8-e5m2 takes none).
constexpr bool has_kv_scales(KvScheme s) { return kv_scale_source(s) != KvScaleSource::kNone; }
// Bytes of one cache element: 2 for bf16, 1 for e4m3 and e5m2.
constexpr int kv_elem_bytes(KvScheme s) { return s == KvScheme::kBf16 ? 2 : 1; }
// Scale values per layer for K and for V: Hkv per head, 1 per tensor, 0 without scales.
constexpr int kv_scales_per_layer(KvScheme s, int num_kv_heads) {
  return kv_scale_source(s) == KvScaleSource::kPerHead     ? num_kv_heads
         : kv_scale_source(s) == KvScaleSource::kPerTensor ? 1
                                                           : 0;
}

}  // namespace fp8kv
