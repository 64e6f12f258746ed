// The three KV-cache schemes (docs/DESIGN.md, "Three KV schemes").
#pragma once

#include <string>

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

inline bool is_fp8(KvScheme s) { return s != KvScheme::kBf16; }
// Bytes of one cache element: 2 for bf16, 1 for e4m3.
inline int kv_elem_bytes(KvScheme s) { return s == KvScheme::kBf16 ? 2 : 1; }

}  // namespace fp8kv
