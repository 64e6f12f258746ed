#include "fp8kv/scheme.h"

#include <algorithm>

#include "fp8kv/error.h"

namespace fp8kv {

const char* scheme_name(KvScheme s) {
  switch (s) {
    case KvScheme::kBf16:
      return "bf16";
    case KvScheme::kFp8PerTensor:
      return "fp8-per-tensor";
    case KvScheme::kFp8PerHead:
      return "fp8-per-head";
    case KvScheme::kFp8E5m2:
      return "fp8-e5m2";
    case KvScheme::kFp8PerHeadBf16Q:
      return "fp8-per-head-bf16q";
  }
  return "unknown";
}

KvScheme parse_scheme(const std::string& text) {
  if (text == "bf16") return KvScheme::kBf16;
  if (text == "fp8-per-tensor" || text == "per-tensor") return KvScheme::kFp8PerTensor;
  if (text == "fp8-per-head" || text == "per-head") return KvScheme::kFp8PerHead;
  if (text == "fp8-e5m2" || text == "e5m2") return KvScheme::kFp8E5m2;
  if (text == "fp8-per-head-bf16q" || text == "per-head-bf16q") return KvScheme::kFp8PerHeadBf16Q;
  throw Error("unknown KV scheme '" + text +
              "' (expected bf16, fp8-per-tensor, fp8-per-head, fp8-e5m2 or fp8-per-head-bf16q)");
}

std::vector<int> parse_layer_list(const std::string& text, const std::string& option) {
  constexpr int kMaxLayer = 1000000;  // far above any model; keeps the parse overflow-free
  std::vector<int> out;
  size_t start = 0;
  while (true) {
    const size_t comma = text.find(',', start);
    const std::string item =
        text.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    const bool digits =
        !item.empty() && item.size() <= 7 &&
        std::all_of(item.begin(), item.end(), [](char c) { return c >= '0' && c <= '9'; });
    if (!digits || std::stoi(item) > kMaxLayer) {
      throw Error(option + ": expected comma-separated layer indices such as 0,31, found '" + item +
                  "' in '" + text + "'");
    }
    const int layer = std::stoi(item);
    if (std::find(out.begin(), out.end(), layer) != out.end()) {
      throw Error(option + ": layer " + item + " is given twice in '" + text + "'");
    }
    out.push_back(layer);
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return out;
}

}  // namespace fp8kv
