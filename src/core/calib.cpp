// kv_cache_calib.json: reading, validating and writing (docs/FORMATS.md), and the slice of the
// scales that one tensor-parallel rank uses.
#include "fp8kv/calib.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/json_input.h"
#include "fp8kv/error.h"
#include "fp8kv/fp8.h"

namespace fp8kv {

using detail::describe;
using detail::FieldReader;
using detail::float_text;
using detail::json_quoted;
using detail::kMaxCalibFileBytes;
using detail::parse_json;
using detail::read_file_bounded;
using detail::within_rounding_step;
using nlohmann::json;

namespace {

constexpr const char* kVersion = "1.0";

// ---- value checks shared by the loader and the writer ----------------------------------------

void check_positive(const std::string& name, const char* field, int value, int min_value) {
  if (value < min_value) {
    throw Error(fmt::format("{}: field '{}': expected an integer >= {}, found {}", name, field,
                            min_value, value));
  }
}

// What a scale column means, for messages: "K scale of head 3".
std::string column_meaning(const CalibData& d, int column) {
  if (d.quant_type == QuantType::kPerTensor) return column == 0 ? "K scale" : "V scale";
  return column < d.num_head ? fmt::format("K scale of head {}", column)
                             : fmt::format("V scale of head {}", column - d.num_head);
}

void check_scales(const std::string& name, const char* field, const std::vector<float>& scales,
                  int columns, const CalibData& d, bool kv) {
  for (size_t i = 0; i < scales.size(); ++i) {
    const float s = scales[i];
    if (std::isfinite(s) && s > 0.0f) continue;
    const int layer = static_cast<int>(i / columns), column = static_cast<int>(i % columns);
    const std::string what =
        kv ? column_meaning(d, column) : fmt::format("Q scale of head {}", column);
    const std::string found = std::isfinite(s) ? fmt::format("{}", s)
                              : std::isnan(s)  ? std::string("nan")
                                               : "a value not finite as float32";
    throw Error(fmt::format(
        "{}: field '{}': layer {}, column {} ({}): expected a finite value > 0, found {}", name,
        field, layer, column, what, found));
  }
}

// FORMATS.md's rules on everything but the scales: version, the model's identity and sizes, the
// scheme, the E4M3 range, the draft split. `name` is the file.
void check_header(const CalibData& d, const std::string& name, const CalibExpect& expect) {
  if (d.version != kVersion) {
    throw Error(fmt::format("{}: field 'version': expected {}, found {}", name,
                            json_quoted(kVersion), json_quoted(d.version)));
  }
  if (expect.architectures && d.architectures != *expect.architectures) {
    throw Error(fmt::format("{}: field 'architectures': expected {} (the model's), found {}", name,
                            json_quoted(*expect.architectures), json_quoted(d.architectures)));
  }
  // A per_tensor file serves a per-head scheme too (broadcast by scales_for_scheme); only per_head
  // for fp8-per-tensor is left to refuse.
  if (expect.quant_type && !quant_type_serves(d.quant_type, *expect.quant_type)) {
    throw Error(fmt::format(
        "{}: field 'quant_type': expected \"{}\" (the scheme fp8-per-tensor), found \"{}\"; {}",
        name, quant_type_name(*expect.quant_type), quant_type_name(d.quant_type),
        detail::per_head_for_per_tensor_hint(name)));
  }
  // The E4M3 range: exact comparisons, the file must say 448.0 / -448.0.
  if (d.qmax != kE4m3Max) {
    throw Error(fmt::format("{}: field 'qmax': expected {} (E4M3's largest finite value), found {}",
                            name, float_text(kE4m3Max), float_text(d.qmax)));
  }
  if (d.qmin != -kE4m3Max) {
    throw Error(fmt::format("{}: field 'qmin': expected {} (-qmax), found {}", name,
                            float_text(-kE4m3Max), float_text(d.qmin)));
  }
  check_positive(name, "num_layers", d.num_layers, 1);
  check_positive(name, "num_head", d.num_head, 1);

  int model_layers = d.num_layers;  // what the model (without a draft) must have
  if (d.num_target_layers.has_value() != d.num_draft_layers.has_value()) {
    throw Error(fmt::format("{}: field '{}': expected together with '{}', found it alone", name,
                            d.num_target_layers ? "num_target_layers" : "num_draft_layers",
                            d.num_target_layers ? "num_draft_layers" : "num_target_layers"));
  }
  if (d.num_target_layers) {
    check_positive(name, "num_target_layers", *d.num_target_layers, 1);
    check_positive(name, "num_draft_layers", *d.num_draft_layers, 0);
    const int64_t sum = int64_t{*d.num_target_layers} + *d.num_draft_layers;
    if (sum != d.num_layers) {
      throw Error(fmt::format(
          "{}: field 'num_layers': expected num_target_layers + num_draft_layers = {} + {} = {}, "
          "found {}",
          name, *d.num_target_layers, *d.num_draft_layers, sum, d.num_layers));
    }
    model_layers = *d.num_target_layers;
  }
  if (expect.num_layers && model_layers != *expect.num_layers) {
    throw Error(fmt::format("{}: field '{}': expected {} (the model's layers), found {}", name,
                            d.num_target_layers ? "num_target_layers" : "num_layers",
                            *expect.num_layers, model_layers));
  }
  // num_head = k x the model's KV heads is LightLLM's per-rank layout (merged after the scales
  // are read); any other value is another model's file.
  if (expect.num_kv_heads && d.num_head % *expect.num_kv_heads != 0) {
    throw Error(fmt::format(
        "{}: field 'num_head': expected {} (the model's KV heads) or a multiple of it (LightLLM's "
        "per-rank layout), found {}",
        name, *expect.num_kv_heads, d.num_head));
  }
}

// FORMATS.md's rules on the scales: [num_layers, row_width] values (and Q scales
// [num_layers, q.num_head]), each finite and > 0 as a float32.
void check_values(const CalibData& d, const std::string& name) {
  const size_t kv_count = static_cast<size_t>(d.num_layers) * d.row_width();
  if (d.scales.size() != kv_count) {
    throw Error(fmt::format("{}: field 'scales': expected {} values ([{}, {}]), found {}", name,
                            kv_count, d.num_layers, d.row_width(), d.scales.size()));
  }
  check_scales(name, "scales", d.scales, d.row_width(), d, /*kv=*/true);

  if (d.q_scales) {
    const QScales& q = *d.q_scales;
    if (d.quant_type != QuantType::kPerHead) {
      throw Error(fmt::format(
          "{}: field 'q_calibration': static Q scales belong to a per_head file (fp8-per-head "
          "quantizes Q; fp8-per-tensor keeps it in bf16), found one with quant_type \"{}\"",
          name, quant_type_name(d.quant_type)));
    }
    check_positive(name, "q_calibration.num_head", q.num_head, 1);
    const size_t q_count = static_cast<size_t>(d.num_layers) * q.num_head;
    if (q.scales.size() != q_count) {
      throw Error(
          fmt::format("{}: field 'q_calibration.scales': expected {} values ([{}, {}]), found {}",
                      name, q_count, d.num_layers, q.num_head, q.scales.size()));
    }
    check_scales(name, "q_calibration.scales", q.scales, q.num_head, d, /*kv=*/false);
  }
}

// q_calibration against the model's H KV heads (FORMATS.md, "q_calibration"): num_head H, or a
// divisor of H (each Q scale covers H / num_head consecutive KV heads; slice_for_rank repeats
// them), or k x H in LightLLM's per-rank layout, whose k copies of a head are merged here by
// max: each rank observed its own query heads of the group, so the copies may differ and the
// group's scale is their max. Anything else is refused, naming the field and both values.
void merge_q_copies(CalibData& d, int num_kv_heads, const std::string& name) {
  QScales& q = *d.q_scales;
  const int H = num_kv_heads;
  if (q.num_head == H || (q.num_head < H && H % q.num_head == 0)) return;
  if (q.num_head % H != 0) {
    throw Error(fmt::format(
        "{}: field 'q_calibration.num_head': expected {} (the model's KV heads), a divisor of it "
        "or a multiple of it (LightLLM's per-rank layout), found {}",
        name, H, q.num_head));
  }
  const int k = q.num_head / H;
  std::vector<float> merged(static_cast<size_t>(d.num_layers) * H);  // [num_layers, H]
  for (int l = 0; l < d.num_layers; ++l) {
    const float* src = q.scales.data() + static_cast<size_t>(l) * q.num_head;
    for (int head = 0; head < H; ++head) {
      merged[static_cast<size_t>(l) * H + head] =
          *std::max_element(src + head * k, src + (head + 1) * k);
    }
  }
  q.num_head = H;
  q.scales = std::move(merged);
}

QuantType parse_quant_type(const FieldReader& reader) {
  const std::string text = reader.string("quant_type");
  if (text == quant_type_name(QuantType::kPerHead)) return QuantType::kPerHead;
  if (text == quant_type_name(QuantType::kPerTensor)) return QuantType::kPerTensor;
  reader.fail("quant_type", "expected \"per_head\" or \"per_tensor\", found " + json_quoted(text));
}

}  // namespace

// ---- public API ------------------------------------------------------------------------------

const char* quant_type_name(QuantType t) {
  switch (t) {
    case QuantType::kPerHead:
      return "per_head";
    case QuantType::kPerTensor:
      return "per_tensor";
  }
  return "unknown";
}

namespace {

// Row `layer`, column of K (is_v false) or V for `head`: per_head [K heads, V heads], per_tensor
// [k, v] (head ignored).
float scale_at(const CalibData& d, int layer, int head, bool is_v) {
  const bool per_head = d.quant_type == QuantType::kPerHead;
  if (layer < 0 || layer >= d.num_layers || (per_head && (head < 0 || head >= d.num_head))) {
    throw Error(fmt::format("{}_scale: (layer {}, head {}) outside [{}, {}]", is_v ? "v" : "k",
                            layer, head, d.num_layers, d.num_head));
  }
  const size_t row = static_cast<size_t>(layer) * d.row_width();
  const int column = per_head ? (is_v ? d.num_head : 0) + head : (is_v ? 1 : 0);
  return d.scales[row + column];
}

}  // namespace

float CalibData::k_scale(int layer, int head) const { return scale_at(*this, layer, head, false); }

float CalibData::v_scale(int layer, int head) const { return scale_at(*this, layer, head, true); }

CalibData parse_calib(const std::string& text, const std::string& name, const CalibExpect& expect) {
  const json root = parse_json(text, name);
  if (!root.is_object()) {
    throw Error(
        fmt::format("{}: expected a JSON object at the top level, found {}", name, describe(root)));
  }
  const FieldReader reader(name, root);
  CalibData d;
  d.version = reader.string("version");
  d.architectures = reader.string("architectures");
  d.quant_type = parse_quant_type(reader);
  // Range-checked as doubles so that 448.0000001 is not rounded into acceptance.
  const double qmin = reader.number("qmin"), qmax = reader.number("qmax");
  if (qmax != static_cast<double>(kE4m3Max)) {
    reader.fail("qmax", fmt::format("expected {} (E4M3's largest finite value), found {}",
                                    float_text(kE4m3Max), qmax));
  }
  if (qmin != -static_cast<double>(kE4m3Max)) {
    reader.fail("qmin", fmt::format("expected {} (-qmax), found {}", float_text(-kE4m3Max), qmin));
  }
  d.qmin = static_cast<float>(qmin);
  d.qmax = static_cast<float>(qmax);
  d.num_layers = reader.integer("num_layers");
  d.num_head = reader.integer("num_head");
  if (reader.has("num_target_layers")) d.num_target_layers = reader.integer("num_target_layers");
  if (reader.has("num_draft_layers")) d.num_draft_layers = reader.integer("num_draft_layers");
  // Identity and sizes first: a file for another model is named as such before its shapes.
  check_header(d, name, expect);

  // scales_shape must agree with quant_type / num_layers / num_head before the scales are read.
  const std::pair<int, int> shape = reader.shape("scales_shape");
  const int64_t width = d.quant_type == QuantType::kPerHead ? int64_t{2} * d.num_head : 2;
  if (shape.first != d.num_layers || shape.second != width) {
    reader.fail("scales_shape",
                fmt::format("expected [{}, {}] ({}: [num_layers, {}]), found [{}, {}]",
                            d.num_layers, width, quant_type_name(d.quant_type),
                            d.quant_type == QuantType::kPerHead ? "2 * num_head" : "2", shape.first,
                            shape.second));
  }
  reader.matrix("scales", shape.first, shape.second, &d.scales);

  if (reader.has("q_calibration")) {
    const json& q_json = reader.get("q_calibration");
    if (!q_json.is_object()) {
      reader.fail("q_calibration", "expected an object, found " + describe(q_json));
    }
    const FieldReader q_reader(name, q_json, "q_calibration.");
    QScales q;
    q.num_head = q_reader.integer("num_head");
    check_positive(name, "q_calibration.num_head", q.num_head, 1);
    const std::pair<int, int> q_shape = q_reader.shape("scales_shape");
    if (q_shape.first != d.num_layers || q_shape.second != q.num_head) {
      q_reader.fail("scales_shape",
                    fmt::format("expected [{}, {}] ([num_layers, q_calibration.num_head]), "
                                "found [{}, {}]",
                                d.num_layers, q.num_head, q_shape.first, q_shape.second));
    }
    q_reader.matrix("scales", q_shape.first, q_shape.second, &q.scales);
    d.q_scales = std::move(q);
  }

  check_values(d, name);
  if (expect.num_kv_heads && d.q_scales) merge_q_copies(d, *expect.num_kv_heads, name);
  if (expect.num_kv_heads && d.num_head != *expect.num_kv_heads) {
    return merge_rank_layout(d, *expect.num_kv_heads, name);
  }
  return d;
}

CalibData load_calib(const std::string& path, const CalibExpect& expect) {
  return parse_calib(read_file_bounded(path), path, expect);
}

std::string calib_to_json(const CalibData& d) {
  // A matrix as one row per line: "[\n    [a, b],\n    [c, d]\n  ]".
  auto matrix_text = [](const std::vector<float>& values, int columns, const char* indent) {
    std::string out = "[";
    const size_t rows = columns > 0 ? values.size() / columns : 0;
    for (size_t r = 0; r < rows; ++r) {
      out += fmt::format("\n{}  [", indent);
      for (int c = 0; c < columns; ++c) {
        out += (c ? ", " : "") + float_text(values[r * columns + c]);
      }
      out += r + 1 < rows ? "]," : "]";
    }
    return out + fmt::format("\n{}]", indent);
  };

  std::string out = "{\n";
  out += fmt::format("  \"version\": {},\n", json_quoted(d.version));
  out += fmt::format("  \"architectures\": {},\n", json_quoted(d.architectures));
  out += fmt::format("  \"quant_type\": \"{}\",\n", quant_type_name(d.quant_type));
  out += fmt::format("  \"qmin\": {},\n", float_text(d.qmin));
  out += fmt::format("  \"qmax\": {},\n", float_text(d.qmax));
  out += fmt::format("  \"num_layers\": {},\n", d.num_layers);
  out += fmt::format("  \"num_head\": {},\n", d.num_head);
  if (d.num_target_layers) {
    out += fmt::format("  \"num_target_layers\": {},\n", *d.num_target_layers);
  }
  if (d.num_draft_layers) out += fmt::format("  \"num_draft_layers\": {},\n", *d.num_draft_layers);
  out += fmt::format("  \"scales_shape\": [{}, {}],\n", d.num_layers, d.row_width());
  out += "  \"scales\": " + matrix_text(d.scales, d.row_width(), "  ");
  if (d.q_scales) {
    const QScales& q = *d.q_scales;
    out += ",\n  \"q_calibration\": {\n";
    out += fmt::format("    \"num_head\": {},\n", q.num_head);
    out += fmt::format("    \"scales_shape\": [{}, {}],\n", d.num_layers, q.num_head);
    out += "    \"scales\": " + matrix_text(q.scales, q.num_head, "    ") + "\n  }";
  }
  return out + "\n}\n";
}

void write_calib(const std::string& path, const CalibData& data) {
  // Never write a file the loader would refuse (a NaN scale, a wrong shape): check first, so a
  // refused write leaves any old file untouched.
  check_header(data, path, CalibExpect{});
  check_values(data, path);
  const std::string text = calib_to_json(data);

  detail::write_text_atomic(path, text);
}

RankScales slice_for_rank(const CalibData& data, int tp, int rank) {
  if (tp < 1) throw Error(fmt::format("tensor parallel size: expected >= 1, found {}", tp));
  if (rank < 0 || rank >= tp) {
    throw Error(fmt::format("rank: expected 0 <= rank < {} (the tensor parallel size), found {}",
                            tp, rank));
  }
  const int H = data.num_head;
  if (H < 1) throw Error(fmt::format("num_head: expected >= 1, found {}", H));
  if (H % tp != 0 && tp % H != 0) {
    throw Error(fmt::format(
        "tensor parallel size {} and num_head {} (KV heads): expected one to divide the other", tp,
        H));
  }
  const size_t kv_count = static_cast<size_t>(data.num_layers) * data.row_width();
  if (data.num_layers < 0 || data.scales.size() != kv_count) {
    throw Error(fmt::format("scales: expected {} values ([{}, {}]), found {}", kv_count,
                            data.num_layers, data.row_width(), data.scales.size()));
  }
  const int h = std::max(1, H / tp);  // KV heads per rank
  const int f = tp * h / H;           // replication of each head (> 1 only when tp > H)
  if ((H * f) % tp != 0) {
    throw Error(fmt::format("num_head {} replicated {} times is not divisible by tp {}", H, f, tp));
  }
  const int first = rank * h;  // first head of this rank in the replicated head order

  RankScales out;
  out.quant_type = data.quant_type;
  out.num_layers = data.num_layers;
  out.heads_per_rank = h;
  if (data.quant_type == QuantType::kPerTensor) {
    out.kv = data.scales;  // [num_layers, 2]: every rank uses the layer's [k, v] as is
  } else {
    out.kv.resize(static_cast<size_t>(data.num_layers) * 2 * h);  // [num_layers, 2 * h]
    for (int l = 0; l < data.num_layers; ++l) {
      const float* row = data.scales.data() + static_cast<size_t>(l) * 2 * H;  // [2 * H]
      float* dst = out.kv.data() + static_cast<size_t>(l) * 2 * h;             // [2 * h]
      for (int j = 0; j < h; ++j) {
        const int head = (first + j) / f;  // replicated head index -> global head
        dst[j] = row[head];                // K
        dst[h + j] = row[H + head];        // V
      }
    }
  }

  if (data.q_scales) {
    const QScales& q = *data.q_scales;
    if (q.num_head < 1 || (tp * h) % q.num_head != 0) {
      throw Error(fmt::format(
          "q_calibration.num_head {}: expected a divisor of tp * heads_per_rank = {} * {} = {}",
          q.num_head, tp, h, tp * h));
    }
    if (q.scales.size() != static_cast<size_t>(data.num_layers) * q.num_head) {
      throw Error(fmt::format("q_calibration.scales: expected {} values ([{}, {}]), found {}",
                              static_cast<size_t>(data.num_layers) * q.num_head, data.num_layers,
                              q.num_head, q.scales.size()));
    }
    const int qf = tp * h / q.num_head;  // replication of each Q-scale head
    std::vector<float> qs(static_cast<size_t>(data.num_layers) * h);  // [num_layers, h]
    for (int l = 0; l < data.num_layers; ++l) {
      for (int j = 0; j < h; ++j) {
        qs[static_cast<size_t>(l) * h + j] =
            q.scales[static_cast<size_t>(l) * q.num_head + (first + j) / qf];
      }
    }
    out.q = std::move(qs);
  }
  return out;
}

CalibData broadcast_to_per_head(const CalibData& data) {
  if (data.quant_type == QuantType::kPerHead) return data;
  const int H = data.num_head;
  if (H < 1) {
    throw Error(fmt::format(
        "per_tensor scales broadcast to every KV head: num_head: expected >= 1 (the model's KV "
        "heads), found {}",
        H));
  }
  if (data.scales.size() != static_cast<size_t>(data.num_layers) * 2) {
    throw Error(fmt::format("scales: expected {} values ([{}, 2]), found {}",
                            static_cast<size_t>(data.num_layers) * 2, data.num_layers,
                            data.scales.size()));
  }
  CalibData out = data;
  out.quant_type = QuantType::kPerHead;
  out.scales.resize(static_cast<size_t>(data.num_layers) * 2 * H);  // [num_layers, 2 * H]
  for (int l = 0; l < data.num_layers; ++l) {
    const float k = data.scales[2 * static_cast<size_t>(l)];
    const float v = data.scales[2 * static_cast<size_t>(l) + 1];
    float* row = out.scales.data() + static_cast<size_t>(l) * 2 * H;
    std::fill(row, row + H, k);
    std::fill(row + H, row + 2 * H, v);
  }
  return out;
}

RankScales scales_for_scheme(const CalibData& data, KvScheme scheme, int tp, int rank) {
  const std::optional<QuantType> want = calib_quant_type(scheme);
  if (!want) {
    throw Error(fmt::format("the {} KV cache takes no calibration file (it has no scales)",
                            scheme_name(scheme)));
  }
  if (!quant_type_serves(data.quant_type, *want)) {
    throw Error(fmt::format("the {} KV cache needs {} scales, got {}; {}", scheme_name(scheme),
                            quant_type_name(*want), quant_type_name(data.quant_type),
                            detail::per_head_for_per_tensor_hint("FILE")));
  }
  if (data.quant_type == *want) return slice_for_rank(data, tp, rank);
  RankScales out = slice_for_rank(broadcast_to_per_head(data), tp, rank);
  out.broadcast_from_per_tensor = true;
  return out;
}

// ---- LightLLM's per-rank layout --------------------------------------------------------------

CalibData to_rank_layout(const CalibData& merged, int tp) {
  if (tp < 1) throw Error(fmt::format("tensor parallel size: expected >= 1, found {}", tp));
  const int H = merged.num_head;
  if (H < 1) throw Error(fmt::format("num_head: expected >= 1, found {}", H));
  if (H % tp != 0 && tp % H != 0) {
    throw Error(fmt::format(
        "tensor parallel size {} and num_head {} (KV heads): expected one to divide the other", tp,
        H));
  }
  if (merged.scales.size() != static_cast<size_t>(merged.num_layers) * merged.row_width()) {
    throw Error(fmt::format("scales: expected {} values ([{}, {}]), found {}",
                            static_cast<size_t>(merged.num_layers) * merged.row_width(),
                            merged.num_layers, merged.row_width(), merged.scales.size()));
  }
  const int h = std::max(1, H / tp);  // KV heads per rank
  const int f = tp * h / H;           // copies of each head (> 1 only when tp > H)
  CalibData out = merged;
  out.rank_layout.reset();
  out.num_head = h * tp;
  if (merged.quant_type == QuantType::kPerTensor || f == 1) return out;
  // Rank r writes its heads r*h.. in order; with f > 1 (h = 1) rank r holds head r / f, so
  // column j of each half is head j / f.
  const int width = 2 * out.num_head;
  out.scales.assign(static_cast<size_t>(merged.num_layers) * width, 0.0f);
  for (int l = 0; l < merged.num_layers; ++l) {
    const float* src = merged.scales.data() + static_cast<size_t>(l) * 2 * H;  // [2 * H]
    float* dst = out.scales.data() + static_cast<size_t>(l) * width;           // [2 * h * tp]
    for (int j = 0; j < out.num_head; ++j) {
      dst[j] = src[j / f];                     // K
      dst[out.num_head + j] = src[H + j / f];  // V
    }
  }
  return out;
}

CalibData merge_rank_layout(const CalibData& data, int num_kv_heads, const std::string& name) {
  const int H = num_kv_heads;
  if (H < 1 || data.num_head < H || data.num_head % H != 0) {
    throw Error(fmt::format(
        "{}: field 'num_head': expected {} (the model's KV heads) or a multiple of it (LightLLM's "
        "per-rank layout), found {}",
        name, H, data.num_head));
  }
  const int k = data.num_head / H;
  if (data.scales.size() != static_cast<size_t>(data.num_layers) * data.row_width()) {
    throw Error(fmt::format("{}: field 'scales': expected {} values ([{}, {}]), found {}", name,
                            static_cast<size_t>(data.num_layers) * data.row_width(),
                            data.num_layers, data.row_width(), data.scales.size()));
  }
  if (k == 1) return data;
  CalibData out = data;
  out.num_head = H;
  RankLayoutOrigin origin;
  origin.copies = k;
  origin.file_num_head = data.num_head;
  if (data.quant_type == QuantType::kPerHead) {
    const int in_width = 2 * data.num_head;
    out.scales.assign(static_cast<size_t>(data.num_layers) * 2 * H, 0.0f);
    for (int l = 0; l < data.num_layers; ++l) {
      const float* src = data.scales.data() + static_cast<size_t>(l) * in_width;  // [2 * k * H]
      float* dst = out.scales.data() + static_cast<size_t>(l) * 2 * H;            // [2 * H]
      for (int c = 0; c < 2 * H; ++c) {  // c: merged column, K heads then V heads
        const bool is_v = c >= H;
        const int head = c % H;
        const int first = (is_v ? data.num_head : 0) + head * k;  // its k copies in the file
        float lo = src[first], hi = src[first];
        int lo_at = first, hi_at = first;
        for (int i = first + 1; i < first + k; ++i) {
          if (src[i] < lo) lo = src[i], lo_at = i;
          if (src[i] > hi) hi = src[i], hi_at = i;
        }
        if (!within_rounding_step(lo, hi)) {
          throw Error(fmt::format(
              "{}: field 'scales': layer {}, {} scale of head {}: its {} copies (columns {}..{}, "
              "LightLLM's per-rank layout of {} KV heads over {} ranks) differ by more than a "
              "float32 rounding step: {} (column {}) vs {} (column {}); a per-rank file must "
              "repeat each head's scale once per rank in rank order",
              name, l, is_v ? "V" : "K", head, k, first, first + k - 1, H, data.num_head, lo, lo_at,
              hi, hi_at));
        }
        dst[c] = hi;
        if (hi - lo > origin.max_disagreement) {
          origin.max_disagreement = hi - lo;
          origin.worst_layer = l;
          origin.worst_column = c;
        }
      }
    }
  }
  out.rank_layout = origin;
  return out;
}

int apparent_rank_copies(const CalibData& data) {
  if (data.quant_type != QuantType::kPerHead) return 1;
  const int n = data.num_head;
  if (data.scales.size() != static_cast<size_t>(data.num_layers) * 2 * n) return 1;
  for (int k = n; k > 1; --k) {
    if (n % k != 0) continue;
    bool runs = true;
    for (int l = 0; l < data.num_layers && runs; ++l) {
      const float* row = data.scales.data() + static_cast<size_t>(l) * 2 * n;
      for (int c = 0; c < 2 * n && runs; ++c) {
        const int first = c - c % k;  // first column of c's run (runs never straddle K and V)
        runs = within_rounding_step(row[first], row[c]);
      }
    }
    if (runs) return k;
  }
  return 1;
}

}  // namespace fp8kv
