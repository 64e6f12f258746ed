#include "fp8kv/scheme.h"

#include "fp8kv/error.h"

namespace fp8kv {

const char* scheme_name(KvScheme s) {
  switch (s) {
    case KvScheme::kBf16: return "bf16";
    case KvScheme::kFp8PerTensor: return "fp8-per-tensor";
    case KvScheme::kFp8PerHead: return "fp8-per-head";
  }
  return "unknown";
}

KvScheme parse_scheme(const std::string& text) {
  if (text == "bf16") return KvScheme::kBf16;
  if (text == "fp8-per-tensor" || text == "per-tensor") return KvScheme::kFp8PerTensor;
  if (text == "fp8-per-head" || text == "per-head") return KvScheme::kFp8PerHead;
  throw Error("unknown KV scheme '" + text +
              "' (expected bf16, fp8-per-tensor or fp8-per-head)");
}

}  // namespace fp8kv
