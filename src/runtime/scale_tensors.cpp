// KV scales as safetensors tensors (vLLM / compressed-tensors and ModelOpt names), model folders
// that carry them, vLLM checkpoint folders, and the loader behind every --calib.
#include "fp8kv/scale_tensors.h"

#include <fmt/format.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "core/json_input.h"
#include "fp8kv/error.h"
#include "fp8kv/kv_formats.h"
#include "fp8kv/safetensors.h"

namespace fp8kv {

namespace fs = std::filesystem;
using detail::describe;
using detail::float_text;
using detail::json;
using detail::json_quoted;

namespace {

constexpr const char* kScalesFile = "kv_scales.safetensors";
constexpr const char* kIndexFile = "model.safetensors.index.json";
constexpr int kMaxLayer = 100000;  // a layer index above this is not a model's

std::string tensor_name(ScaleNaming naming, int layer, bool is_v) {
  if (naming == ScaleNaming::kVllm) {
    return fmt::format("model.layers.{}.self_attn.{}", layer, is_v ? "v_scale" : "k_scale");
  }
  return fmt::format("model.layers.{}.self_attn.{}", layer,
                     is_v ? "v_proj.v_scale" : "k_proj.k_scale");
}

// "model.layers.12.self_attn.k_proj.k_scale" -> {12, modelopt, K}; nullopt for other names.
struct ScaleName {
  int layer;
  ScaleNaming naming;
  bool is_v;
};
std::optional<ScaleName> parse_scale_name(const std::string& name) {
  static const std::string kPrefix = "model.layers.";
  if (name.rfind(kPrefix, 0) != 0) return std::nullopt;
  size_t i = kPrefix.size(), digits = 0;
  int layer = 0;
  while (i < name.size() && name[i] >= '0' && name[i] <= '9' && digits < 6) {
    layer = layer * 10 + (name[i] - '0');
    ++i, ++digits;
  }
  if (digits == 0 || (digits > 1 && name[kPrefix.size()] == '0') || layer > kMaxLayer) {
    return std::nullopt;
  }
  const std::string rest = name.substr(i);
  if (rest == ".self_attn.k_scale") return ScaleName{layer, ScaleNaming::kVllm, false};
  if (rest == ".self_attn.v_scale") return ScaleName{layer, ScaleNaming::kVllm, true};
  if (rest == ".self_attn.k_proj.k_scale") return ScaleName{layer, ScaleNaming::kModelopt, false};
  if (rest == ".self_attn.v_proj.v_scale") return ScaleName{layer, ScaleNaming::kModelopt, true};
  return std::nullopt;
}

// The tensors of one .safetensors file, of a folder's index-listed shards (WeightStore), or of
// every *.safetensors in a folder without an index (a tensor in two files refused).
class TensorSet {
 public:
  static TensorSet of_file(const std::string& path) {
    TensorSet s;
    s.files_.push_back(std::make_unique<SafetensorsFile>(path));
    for (const std::string& n : s.files_[0]->names()) s.where_[n] = 0;
    s.describe_ = path;
    return s;
  }
  static TensorSet of_folder(const std::string& dir) {
    TensorSet s;
    s.describe_ = dir;
    if (fs::exists(fs::path(dir) / kIndexFile)) {
      s.store_ = std::make_unique<WeightStore>(dir);
      return s;
    }
    std::vector<std::string> paths;
    for (const auto& e : fs::directory_iterator(dir)) {
      if (e.path().extension() == ".safetensors") paths.push_back(e.path().string());
    }
    std::sort(paths.begin(), paths.end());
    for (const std::string& p : paths) {
      s.files_.push_back(std::make_unique<SafetensorsFile>(p));
      for (const std::string& n : s.files_.back()->names()) {
        auto [it, fresh] = s.where_.emplace(n, s.files_.size() - 1);
        if (!fresh && parse_scale_name(n)) {
          throw Error(
              fmt::format("{}: tensor '{}' is in both {} and {} (and no {} says which "
                          "to use)",
                          dir, n, s.files_[it->second]->path(), p, kIndexFile));
        }
      }
    }
    return s;
  }
  std::vector<std::string> names() const {
    if (store_) return store_->names();
    std::vector<std::string> out;
    for (const auto& kv : where_) out.push_back(kv.first);
    return out;
  }
  const TensorInfo& info(const std::string& n) const {
    return store_ ? store_->info(n) : files_[where_.at(n)]->info(n);
  }
  std::vector<float> read(const std::string& n) const {
    const TensorInfo& t = info(n);
    return store_ ? store_->read_f32(n, t.shape) : files_[where_.at(n)]->read_f32(n, t.shape);
  }
  std::string file_of(const std::string& n) const {
    return store_ ? (fs::path(describe_) / store_->file_name_of(n)).string()
                  : files_[where_.at(n)]->path();
  }
  size_t file_count() const { return store_ ? store_->files().size() : files_.size(); }

 private:
  std::string describe_;
  std::unique_ptr<WeightStore> store_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, size_t> where_;
};

// What a folder's config.json says that matters here.
struct FolderConfig {
  std::string path;
  std::optional<std::string> architectures, model_type;
  std::optional<int> num_layers, num_kv_heads;
  std::optional<std::string> strategy;  // quantization_config.kv_cache_scheme.strategy
  json root;
};

FolderConfig read_folder_config(const std::string& dir) {
  FolderConfig c;
  c.path = (fs::path(dir) / "config.json").string();
  if (!fs::exists(c.path)) return c;
  c.root = detail::parse_json(detail::read_file_bounded(c.path), c.path);
  if (!c.root.is_object()) {
    throw Error(fmt::format("{}: expected a JSON object at the top level, found {}", c.path,
                            describe(c.root)));
  }
  const detail::FieldReader r(c.path, c.root);
  if (r.has("architectures")) {
    const json& a = r.get("architectures");
    if (!a.is_array() || a.empty() || !a[0].is_string()) {
      r.fail("architectures", "expected an array of names, found " + describe(a));
    }
    c.architectures = a[0].get<std::string>();
  }
  if (r.has("model_type")) c.model_type = r.string("model_type");
  if (r.has("num_hidden_layers")) c.num_layers = r.integer("num_hidden_layers");
  if (r.has("num_key_value_heads")) {
    c.num_kv_heads = r.integer("num_key_value_heads");
  } else if (r.has("num_attention_heads")) {
    c.num_kv_heads = r.integer("num_attention_heads");
  }
  if (r.has("quantization_config")) {
    const json& q = r.get("quantization_config");
    if (!q.is_object()) r.fail("quantization_config", "expected an object, found " + describe(q));
    if (q.contains("kv_cache_scheme") && !q["kv_cache_scheme"].is_null()) {
      const json& s = q["kv_cache_scheme"];
      const detail::FieldReader sr(c.path, s, "quantization_config.kv_cache_scheme.");
      if (!s.is_object()) {
        r.fail("quantization_config.kv_cache_scheme", "expected an object, found " + describe(s));
      }
      if (sr.integer("num_bits") != 8) {
        sr.fail("num_bits",
                fmt::format("expected 8 (an FP8 cache), found {}", sr.integer("num_bits")));
      }
      if (sr.string("type") != "float") {
        sr.fail("type",
                "expected \"float\" (an FP8 cache), found " + json_quoted(sr.string("type")));
      }
      if (sr.has("dynamic") &&
          !(sr.get("dynamic").is_boolean() && !sr.get("dynamic").get<bool>())) {
        sr.fail("dynamic", "expected false (static scales from the checkpoint), found " +
                               describe(sr.get("dynamic")));
      }
      if (sr.has("symmetric") &&
          !(sr.get("symmetric").is_boolean() && sr.get("symmetric").get<bool>())) {
        sr.fail("symmetric", "expected true, found " + describe(sr.get("symmetric")));
      }
      const std::string strategy = sr.string("strategy");
      if (strategy != "tensor" && strategy != "attn_head") {
        sr.fail("strategy", "expected \"tensor\" or \"attn_head\", found " + json_quoted(strategy));
      }
      c.strategy = strategy;
    }
  }
  return c;
}

// Reads the scale tensors of `set` into CalibData. `where` names the source in messages.
LoadedScales read_scales(const TensorSet& set, const std::string& where, const FolderConfig& cfg,
                         const CalibExpect& expect) {
  // layer -> {K name, V name}; one naming throughout.
  std::map<int, std::pair<std::string, std::string>> found;
  std::optional<ScaleNaming> naming;
  std::string first_name;
  for (const std::string& n : set.names()) {
    const std::optional<ScaleName> s = parse_scale_name(n);
    if (!s) continue;
    if (naming && *naming != s->naming) {
      throw Error(fmt::format(
          "{}: tensor '{}' uses {} names but '{}' uses {} names; one "
          "checkpoint holds one kind",
          where, n, scale_naming_name(s->naming), first_name, scale_naming_name(*naming)));
    }
    naming = s->naming;
    if (first_name.empty()) first_name = n;
    (s->is_v ? found[s->layer].second : found[s->layer].first) = n;
  }
  if (!naming) {
    throw Error(
        fmt::format("{}: no KV scale tensors (model.layers.N.self_attn.k_scale / v_scale, or "
                    "model.layers.N.self_attn.k_proj.k_scale / v_proj.v_scale)",
                    where));
  }
  // The layer count: the model's, else the folder config's, else the highest layer + 1.
  int num_layers = found.rbegin()->first + 1;
  std::string layers_from = "the highest layer with a scale";
  if (expect.num_layers) {
    num_layers = *expect.num_layers, layers_from = "the model's";
  } else if (cfg.num_layers) {
    num_layers = *cfg.num_layers, layers_from = cfg.path + "'s num_hidden_layers";
  }
  if (found.rbegin()->first >= num_layers) {
    throw Error(fmt::format("{}: tensor '{}' is for layer {}, but the model has {} layers ({})",
                            where,
                            found.rbegin()->second.first.empty() ? found.rbegin()->second.second
                                                                 : found.rbegin()->second.first,
                            found.rbegin()->first, num_layers, layers_from));
  }
  for (int l = 0; l < num_layers; ++l) {
    auto it = found.find(l);
    const std::string k = tensor_name(*naming, l, false), v = tensor_name(*naming, l, true);
    if (it == found.end()) {
      throw Error(
          fmt::format("{}: no tensor '{}' nor '{}': layer {} of {} has no KV scales (fp8kv "
                      "does not substitute 1.0)",
                      where, k, v, l, num_layers));
    }
    if (it->second.first.empty() || it->second.second.empty()) {
      const bool has_v = !it->second.second.empty();
      throw Error(fmt::format(
          "{}: no tensor '{}': layer {} has a {} scale ('{}') but no {} "
          "scale (fp8kv does not substitute 1.0)",
          where, has_v ? k : v, l, has_v ? "V" : "K", has_v ? v : k, has_v ? "K" : "V"));
    }
  }

  // Shapes: [] or [1] per tensor, [H] per head; one kind and one H for every tensor.
  int heads = 0;  // 1 for per tensor
  std::string heads_from;
  for (int l = 0; l < num_layers; ++l) {
    for (const std::string& n : {found[l].first, found[l].second}) {
      const std::vector<int64_t>& shape = set.info(n).shape;
      int h = -1;
      if (shape.empty() || (shape.size() == 1 && shape[0] == 1)) h = 1;
      if (shape.size() == 1 && shape[0] > 1 && shape[0] <= kMaxLayer)
        h = static_cast<int>(shape[0]);
      if (h < 0) {
        throw Error(
            fmt::format("{}: tensor '{}' has shape {}: expected [1] (per tensor) or "
                        "[num_kv_heads] (per head)",
                        set.file_of(n), n, shape_to_string(shape)));
      }
      if (heads == 0) {
        heads = h, heads_from = n;
      } else if (h != heads) {
        throw Error(
            fmt::format("{}: tensor '{}' has shape {} but '{}' has shape {}: every KV "
                        "scale of one checkpoint has one granularity",
                        where, n, shape_to_string(set.info(n).shape), heads_from,
                        shape_to_string(set.info(heads_from).shape)));
      }
    }
  }
  const bool per_head = heads > 1;
  const std::optional<int> model_heads =
      expect.num_kv_heads ? expect.num_kv_heads : cfg.num_kv_heads;
  if (per_head && model_heads && heads != *model_heads) {
    throw Error(fmt::format("{}: tensor '{}' has shape [{}], but the model has {} KV heads{}",
                            where, heads_from, heads, *model_heads,
                            expect.num_kv_heads ? "" : " (" + cfg.path + ")"));
  }
  if (cfg.strategy) {
    const char* want = per_head ? "attn_head" : "tensor";
    if (*cfg.strategy != want) {
      throw Error(fmt::format(
          "{}: field 'quantization_config.kv_cache_scheme.strategy': \"{}\", but tensor '{}' "
          "has shape {} ({}, strategy \"{}\")",
          cfg.path, *cfg.strategy, heads_from, shape_to_string(set.info(heads_from).shape),
          per_head ? "per head" : "per tensor", want));
    }
  }
  // Per-tensor tensors serve a per-head scheme (broadcast, scales_for_scheme); per-head ones
  // for fp8-per-tensor are refused.
  const bool want_head = expect.quant_type == QuantType::kPerHead;
  if (expect.quant_type && per_head && !want_head) {
    throw Error(fmt::format(
        "{}: tensor '{}' has shape {}: per-head scales, but the scheme fp8-per-tensor needs "
        "per-tensor ([1]) scales; {}",
        where, heads_from, shape_to_string(set.info(heads_from).shape),
        detail::per_head_for_per_tensor_hint(where)));
  }
  if (expect.architectures && cfg.architectures && *cfg.architectures != *expect.architectures) {
    throw Error(fmt::format("{}: field 'architectures': expected {} (the model's), found {}",
                            cfg.path, json_quoted(*expect.architectures),
                            json_quoted(*cfg.architectures)));
  }

  LoadedScales out;
  CalibData& d = out.data;
  d.architectures = expect.architectures.value_or(cfg.architectures.value_or(""));
  d.num_layers = num_layers;
  // A model with one KV head stores per-head scales as [1]: read them as per head when asked.
  const bool as_head = per_head || (want_head && model_heads && *model_heads == 1);
  d.quant_type = as_head ? QuantType::kPerHead : QuantType::kPerTensor;
  d.num_head = per_head ? heads : model_heads.value_or(as_head ? 1 : 0);
  const int width = as_head ? 2 * heads : 2;
  d.scales.resize(static_cast<size_t>(num_layers) * width);
  for (int l = 0; l < num_layers; ++l) {
    for (int half = 0; half < 2; ++half) {
      const std::string& n = half ? found[l].second : found[l].first;
      const std::vector<float> values = set.read(n);
      for (size_t i = 0; i < values.size(); ++i) {
        const float s = values[i];
        if (!std::isfinite(s) || !(s > 0.0f)) {
          throw Error(fmt::format("{}: tensor '{}'{}: expected a finite scale > 0, found {}",
                                  set.file_of(n), n,
                                  values.size() > 1 ? fmt::format(", head {}", i) : "",
                                  std::isnan(s) ? std::string("nan") : fmt::format("{}", s)));
        }
        d.scales[static_cast<size_t>(l) * width + half * (width / 2) + i] = s;
      }
    }
  }
  out.format = scale_naming_name(*naming);
  out.detail = fmt::format(
      "{} layers of {} tensors in {} file{}{}", num_layers,
      per_head ? fmt::format("[{}]", heads) : std::string("[1]"), set.file_count(),
      set.file_count() == 1 ? "" : "s",
      cfg.strategy ? "; config.json kv_cache_scheme strategy \"" + *cfg.strategy + "\"" : "");
  return out;
}

void refuse_draft_and_q(const CalibData& d, const char* format) {
  if (d.num_draft_layers && *d.num_draft_layers > 0) {
    throw Error(
        fmt::format("{} has no place for the {} draft-model layers of this file "
                    "(num_draft_layers)",
                    format, *d.num_draft_layers));
  }
  if (d.q_scales) {
    throw Error(
        fmt::format("{} has no place for this file's q_calibration (static Q scales); "
                    "--drop-q-scales writes the K/V scales without them",
                    format));
  }
}

}  // namespace

const char* scale_naming_name(ScaleNaming n) {
  return n == ScaleNaming::kVllm ? "vllm-checkpoint" : "modelopt";
}

LoadedScales load_kv_scales(const std::string& path, const CalibExpect& expect, bool reduce_max) {
  std::error_code ec;
  if (fs::is_directory(path, ec)) {
    const FolderConfig cfg = read_folder_config(path);
    return read_scales(TensorSet::of_folder(path), path, cfg, expect);
  }
  if (path.size() >= 12 && path.compare(path.size() - 12, 12, ".safetensors") == 0) {
    return read_scales(TensorSet::of_file(path), path, FolderConfig{}, expect);
  }
  const std::string text = detail::read_file_bounded(path);
  LoadedScales out;
  if (is_quant_param_json(text, path)) {
    std::string model_type;
    out.data = parse_quant_param_json(text, path, expect, reduce_max, &model_type);
    out.format = "quant-param-json";
    out.detail = fmt::format("model_type {}, one scale per layer for K and V",
                             model_type.empty() ? "null" : json_quoted(model_type));
    return out;
  }
  out.data = parse_calib(text, path, expect);
  out.format = "lightllm";
  return out;
}

void write_scale_tensors(const std::string& path, const CalibData& d, ScaleNaming naming) {
  const char* format = scale_naming_name(naming);
  refuse_draft_and_q(d, format);
  const bool per_head = d.quant_type == QuantType::kPerHead;
  if (per_head && naming == ScaleNaming::kModelopt) {
    throw Error(
        "modelopt holds one K and one V scale per layer: a per_head file needs --reduce max "
        "(each layer's max over its KV heads)");
  }
  const int width = d.row_width(), half = width / 2;
  if (d.num_layers < 1 || d.scales.size() != static_cast<size_t>(d.num_layers) * width) {
    throw Error(fmt::format("scales: expected {} values ([{}, {}]), found {}",
                            static_cast<size_t>(d.num_layers) * width, d.num_layers, width,
                            d.scales.size()));
  }
  for (size_t i = 0; i < d.scales.size(); ++i) {
    if (!std::isfinite(d.scales[i]) || !(d.scales[i] > 0.0f)) {
      throw Error(fmt::format("scales: layer {}, column {}: expected a finite scale > 0, found {}",
                              i / width, i % width, d.scales[i]));
    }
  }
  std::vector<TensorSpec> specs;
  for (int l = 0; l < d.num_layers; ++l) {
    for (int is_v = 0; is_v < 2; ++is_v) {
      specs.push_back({tensor_name(naming, l, is_v), DType::kF32, {int64_t{half}}});
    }
  }
  write_safetensors(path, specs, [&](size_t i, uint8_t* dst, size_t bytes) {
    const size_t layer = i / 2, is_v = i % 2;
    std::memcpy(dst, d.scales.data() + layer * width + is_v * half, bytes);
  });
}

CheckpointWritten write_vllm_checkpoint(const std::string& out_dir, const std::string& model_dir,
                                        const CalibData& d) {
  refuse_draft_and_q(d, "vllm-checkpoint");
  std::error_code ec;
  if (!fs::is_directory(model_dir, ec)) {
    throw Error(fmt::format("--model {}: not a model folder", model_dir));
  }
  if (fs::exists(out_dir, ec) && fs::equivalent(out_dir, model_dir, ec)) {
    throw Error(
        fmt::format("convert: OUT {} is the model folder itself; write a new folder "
                    "(its config.json would be replaced)",
                    out_dir));
  }
  FolderConfig cfg = read_folder_config(model_dir);
  if (cfg.root.is_null()) throw Error(fmt::format("{}: cannot open: no such file", cfg.path));
  const bool per_head = d.quant_type == QuantType::kPerHead;
  if (cfg.num_layers && *cfg.num_layers != d.num_layers) {
    throw Error(fmt::format("{}: field 'num_hidden_layers': {}, but the scales have {} layers",
                            cfg.path, *cfg.num_layers, d.num_layers));
  }
  if (per_head && cfg.num_kv_heads && *cfg.num_kv_heads != d.num_head) {
    throw Error(fmt::format("{}: field 'num_key_value_heads': {}, but the scales have {} KV heads",
                            cfg.path, *cfg.num_kv_heads, d.num_head));
  }
  if (!d.architectures.empty() && cfg.architectures && *cfg.architectures != d.architectures) {
    throw Error(fmt::format("{}: field 'architectures': {}, but the scales are for {}", cfg.path,
                            json_quoted(*cfg.architectures), json_quoted(d.architectures)));
  }
  // The model must not carry KV scales already: vLLM would find two of each.
  const TensorSet model_tensors = TensorSet::of_folder(model_dir);
  for (const std::string& n : model_tensors.names()) {
    if (parse_scale_name(n)) {
      throw Error(
          fmt::format("{}: the model already carries KV scale tensors ('{}' in {}); "
                      "writing more would give vLLM two of each",
                      model_dir, n, model_tensors.file_of(n)));
    }
  }

  json config = cfg.root;
  CheckpointWritten w;
  w.strategy = per_head ? "attn_head" : "tensor";
  const json scheme = {{"num_bits", 8},
                       {"type", "float"},
                       {"strategy", w.strategy},
                       {"symmetric", true},
                       {"dynamic", false}};
  if (!config.contains("quantization_config")) {
    w.new_quantization_config = true;
    config["quantization_config"] = {{"quant_method", "compressed-tensors"},
                                     {"format", "dense"},
                                     {"quantization_status", "compressed"},
                                     {"config_groups", json::object()},
                                     {"ignore", json::array()},
                                     {"kv_cache_scheme", scheme}};
  } else {
    json& q = config["quantization_config"];
    const json method = q.contains("quant_method") ? q["quant_method"] : json();
    if (method != "compressed-tensors") {
      throw Error(fmt::format(
          "{}: field 'quantization_config.quant_method': expected \"compressed-tensors\" (only "
          "that config takes a kv_cache_scheme; a ModelOpt model: --to modelopt), found {}",
          cfg.path, describe(method)));
    }
    q["kv_cache_scheme"] = scheme;
  }

  fs::create_directories(out_dir, ec);
  if (ec) throw Error(fmt::format("{}: cannot create folder: {}", out_dir, ec.message()));
  w.tensors = (fs::path(out_dir) / kScalesFile).string();
  w.config = (fs::path(out_dir) / "config.json").string();
  std::optional<std::string> index_text;
  const fs::path index_in = fs::path(model_dir) / kIndexFile;
  if (fs::exists(index_in)) {
    json index =
        detail::parse_json(detail::read_file_bounded(index_in.string()), index_in.string());
    if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object()) {
      throw Error(index_in.string() + ": missing object field 'weight_map'");
    }
    for (int l = 0; l < d.num_layers; ++l) {
      for (int is_v = 0; is_v < 2; ++is_v) {
        index["weight_map"][tensor_name(ScaleNaming::kVllm, l, is_v)] = kScalesFile;
      }
    }
    index_text = index.dump(2) + "\n";
    w.index = (fs::path(out_dir) / kIndexFile).string();
  }
  write_scale_tensors(w.tensors, d, ScaleNaming::kVllm);
  if (index_text) detail::write_text_atomic(w.index, *index_text);
  detail::write_text_atomic(w.config, config.dump(2) + "\n");
  return w;
}

}  // namespace fp8kv
