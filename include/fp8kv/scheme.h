// The three KV-cache schemes (docs/DESIGN.md, "Three KV schemes").
#pragma once

#include <string>
#include <vector>

#include "fp8kv/export.h"

namespace fp8kv {

enum class KvScheme {
  kBf16,          // bf16 cache, no scales; also the cache used while calibrating
  kFp8PerTensor,  // e4m3 cache, one K and one V scale per layer; bf16 Q
  kFp8PerHead,    // e4m3 cache, one K and one V scale per (layer, KV head); e4m3 Q
};

// "bf16", "fp8-per-tensor", "fp8-per-head".
FP8KV_API const char* scheme_name(KvScheme s);
// Accepts the names above (and "per-head"/"per-tensor" for the FP8 schemes); throws Error
// naming the text otherwise.
FP8KV_API KvScheme parse_scheme(const std::string& text);

// "0,31" -> {0, 31}: layer indices for --kv-bf16-layers, in the order given. Throws Error naming
// `option` and the bad entry on anything but comma-separated non-negative integers, and on a
// layer given twice. Whether the layers exist is the pool's check (KvPool).
FP8KV_API std::vector<int> parse_layer_list(const std::string& text, const std::string& option);

inline bool is_fp8(KvScheme s) { return s != KvScheme::kBf16; }
// Bytes of one cache element: 2 for bf16, 1 for e4m3.
inline int kv_elem_bytes(KvScheme s) { return s == KvScheme::kBf16 ? 2 : 1; }

}  // namespace fp8kv
