// The quant-param JSON (vLLM / SGLang --quantization-param-path) and per_head -> per_tensor
// reduction (docs/FORMATS.md, "Other engines' formats").
#include "fp8kv/kv_formats.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "core/json_input.h"
#include "fp8kv/error.h"

namespace fp8kv {

using detail::describe;
using detail::float_text;
using detail::json;
using detail::json_quoted;

namespace {

constexpr const char* kE4m3DtypeName = "float8_e4m3fn";  // vLLM checks this exact string
// A rank or layer key: a decimal int without sign or leading zeros, below this bound (no model
// has a million layers or ranks; the bound keeps the parse simple and the message clear).
constexpr int kMaxIndexKey = 1000000;

// "12" -> 12; -1 for anything that is not a canonical decimal index below kMaxIndexKey.
int index_key(const std::string& key) {
  if (key.empty() || key.size() > 7 || (key.size() > 1 && key[0] == '0')) return -1;
  int v = 0;
  for (char c : key) {
    if (c < '0' || c > '9') return -1;
    v = v * 10 + (c - '0');
  }
  return v < kMaxIndexKey ? v : -1;
}

// The members of an object keyed 0..n-1, in index order. Refuses a key that is not an index
// and a gap (naming the first missing index). `field` is the object's path for messages.
std::vector<const json*> indexed_members(const json& object, const std::string& name,
                                         const std::string& field, const char* what) {
  std::map<int, const json*> by_index;
  for (auto it = object.begin(); it != object.end(); ++it) {
    const int i = index_key(it.key());
    if (i < 0) {
      throw Error(fmt::format("{}: field '{}': key {}: expected a {} index (\"0\", \"1\", ...)",
                              name, field, json_quoted(it.key()), what));
    }
    by_index[i] = &it.value();
  }
  std::vector<const json*> out;
  for (const auto& [i, value] : by_index) {
    if (i != static_cast<int>(out.size())) {
      throw Error(fmt::format(
          "{}: field '{}': {} \"{}\" is missing (found {} {} keys up to "
          "\"{}\"; every {} from 0 must be listed)",
          name, field, what, out.size(), by_index.size(), what, by_index.rbegin()->first, what));
    }
    out.push_back(value);
  }
  return out;
}

}  // namespace

bool is_quant_param_json(const std::string& text, const std::string& name) {
  const json root = detail::parse_json(text, name);
  return root.is_object() && root.contains("kv_cache");
}

CalibData parse_quant_param_json(const std::string& text, const std::string& name,
                                 const CalibExpect& expect, bool reduce_max,
                                 std::string* model_type) {
  const json root = detail::parse_json(text, name);
  if (!root.is_object()) {
    throw Error(
        fmt::format("{}: expected a JSON object at the top level, found {}", name, describe(root)));
  }
  const detail::FieldReader top(name, root);
  std::string type;
  if (top.has("model_type") && !top.get("model_type").is_null()) type = top.string("model_type");
  if (model_type) *model_type = type;
  const json& kv = top.get("kv_cache");
  if (!kv.is_object()) top.fail("kv_cache", "expected an object, found " + describe(kv));
  const detail::FieldReader kv_reader(name, kv, "kv_cache.");
  const std::string dtype = kv_reader.string("dtype");
  if (dtype != kE4m3DtypeName) {
    kv_reader.fail("dtype",
                   fmt::format("expected \"{}\" (the only dtype vLLM reads here), found {}",
                               kE4m3DtypeName, json_quoted(dtype)));
  }
  const json& sf = kv_reader.get("scaling_factor");
  if (!sf.is_object() || sf.empty()) {
    kv_reader.fail("scaling_factor",
                   "expected an object {\"<tp_rank>\": {\"<layer>\": scale}} with at least rank "
                   "\"0\", found " +
                       describe(sf));
  }
  const std::vector<const json*> ranks =
      indexed_members(sf, name, "kv_cache.scaling_factor", "rank");

  // [rank][layer] as float32, each finite and > 0.
  std::vector<std::vector<float>> per_rank;
  for (size_t r = 0; r < ranks.size(); ++r) {
    const std::string field = fmt::format("kv_cache.scaling_factor.{}", r);
    const json& layers_json = *ranks[r];
    if (!layers_json.is_object() || layers_json.empty()) {
      throw Error(fmt::format("{}: field '{}': expected an object {{\"<layer>\": scale}}, found {}",
                              name, field, describe(layers_json)));
    }
    const std::vector<const json*> layers = indexed_members(layers_json, name, field, "layer");
    std::vector<float> scales;
    for (size_t l = 0; l < layers.size(); ++l) {
      const json& x = *layers[l];
      const float s = x.is_number() ? static_cast<float>(x.get<double>()) : 0.0f;
      if (!x.is_number() || !std::isfinite(s) || !(s > 0.0f)) {
        throw Error(
            fmt::format("{}: field '{}.{}': expected a finite scale > 0 (as float32), "
                        "found {}",
                        name, field, l, describe(x)));
      }
      scales.push_back(s);
    }
    if (r > 0 && scales.size() != per_rank[0].size()) {
      throw Error(fmt::format("{}: field '{}': {} layers, but rank 0 lists {}", name, field,
                              scales.size(), per_rank[0].size()));
    }
    per_rank.push_back(std::move(scales));
  }
  const int num_layers = static_cast<int>(per_rank[0].size());
  if (expect.num_layers && num_layers != *expect.num_layers) {
    throw Error(fmt::format(
        "{}: field 'kv_cache.scaling_factor.0': expected {} layers (the model's), found {}", name,
        *expect.num_layers, num_layers));
  }
  // One scale per layer serves every scheme with scales: the per-head ones take it broadcast
  // (quant_type_serves), so expect.quant_type has nothing to refuse here.

  CalibData d;
  d.architectures = expect.architectures.value_or("");
  d.quant_type = QuantType::kPerTensor;
  d.num_layers = num_layers;
  d.num_head = expect.num_kv_heads.value_or(0);
  d.scales.resize(static_cast<size_t>(num_layers) * 2);
  for (int l = 0; l < num_layers; ++l) {
    float s = per_rank[0][l];
    for (size_t r = 1; r < per_rank.size(); ++r) {
      const float other = per_rank[r][l];
      if (other != s && !reduce_max) {
        throw Error(fmt::format(
            "{}: field 'kv_cache.scaling_factor.{}.{}': {} differs from rank 0's {} (one "
            "model-wide scale per layer is what fp8kv keeps; --reduce max takes the max over "
            "the ranks)",
            name, r, l, float_text(other), float_text(s)));
      }
      s = std::max(s, other);
    }
    d.scales[2 * l] = s;
    d.scales[2 * l + 1] = s;
  }
  return d;
}

std::string quant_param_json_text(const CalibData& d, const std::string& model_type, int tp) {
  if (tp < 1) throw Error(fmt::format("--tp: expected >= 1, found {}", tp));
  if (d.quant_type != QuantType::kPerTensor) {
    throw Error(
        "quant-param-json holds one scale per layer: a per_head file needs --reduce max (each "
        "layer's max over its KV heads, and over K and V)");
  }
  if (d.num_draft_layers && *d.num_draft_layers > 0) {
    throw Error(
        fmt::format("quant-param-json has no place for the {} draft-model layers of this "
                    "file (num_draft_layers)",
                    *d.num_draft_layers));
  }
  if (d.scales.size() != static_cast<size_t>(d.num_layers) * 2) {
    throw Error(fmt::format("scales: expected {} values ([{}, 2]), found {}", d.num_layers * 2,
                            d.num_layers, d.scales.size()));
  }
  std::string layers;
  for (int l = 0; l < d.num_layers; ++l) {
    const float s = std::max(d.scales[2 * l], d.scales[2 * l + 1]);
    if (!std::isfinite(s) || !(s > 0.0f)) {
      throw Error(fmt::format("scales: layer {}: expected a finite scale > 0, found {}", l, s));
    }
    layers += fmt::format("{}\"{}\": {}", l ? ", " : "", l, float_text(s));
  }
  std::string out = "{\n";
  const std::string type_text = model_type.empty() ? "null" : json_quoted(model_type);
  out += fmt::format("  \"model_type\": {},\n", type_text);
  out += "  \"kv_cache\": {\n";
  out += fmt::format("    \"dtype\": \"{}\",\n", kE4m3DtypeName);
  out += "    \"scaling_factor\": {\n";
  for (int r = 0; r < tp; ++r) {
    out += fmt::format("      \"{}\": {{{}}}{}\n", r, layers, r + 1 < tp ? "," : "");
  }
  return out + "    }\n  }\n}\n";
}

CalibData reduce_to_per_tensor(const CalibData& d) {
  if (d.quant_type == QuantType::kPerTensor) return d;
  const int H = d.num_head;
  if (d.scales.size() != static_cast<size_t>(d.num_layers) * 2 * H || H < 1) {
    throw Error(fmt::format("scales: expected {} values ([{}, 2 * {}]), found {}",
                            static_cast<size_t>(d.num_layers) * 2 * H, d.num_layers, H,
                            d.scales.size()));
  }
  CalibData out = d;
  out.quant_type = QuantType::kPerTensor;
  out.rank_layout.reset();
  out.scales.assign(static_cast<size_t>(d.num_layers) * 2, 0.0f);
  for (int l = 0; l < d.num_layers; ++l) {
    const float* row = d.scales.data() + static_cast<size_t>(l) * 2 * H;  // [2 * H]
    out.scales[2 * l] = *std::max_element(row, row + H);
    out.scales[2 * l + 1] = *std::max_element(row + H, row + 2 * H);
  }
  return out;
}

}  // namespace fp8kv
