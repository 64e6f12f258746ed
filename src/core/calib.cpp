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

#include "fp8kv/error.h"
#include "fp8kv/fp8.h"

namespace fp8kv {

using nlohmann::json;

namespace {

// Hostile-input bounds, checked before any text reaches the JSON parser. A real file is a few
// KB (64 layers x 64 heads of scales is ~100 KB), so these leave room for any model.
constexpr int64_t kMaxCalibFileBytes = int64_t{64} << 20;  // 64 MiB
constexpr int kMaxJsonDepth = 64;                          // nesting of [ and {
constexpr size_t kMaxShownValueChars = 48;                 // how much of a bad value to quote
constexpr const char* kVersion = "1.0";

// ---- messages --------------------------------------------------------------------------------

// 1-based line and column of byte `offset` in `text`.
std::string position_of(const std::string& text, size_t offset) {
  size_t line = 1, column = 1;
  for (size_t i = 0; i < offset && i < text.size(); ++i) {
    if (text[i] == '\n') {
      ++line;
      column = 1;
    } else {
      ++column;
    }
  }
  return fmt::format("line {}, column {}", line, column);
}

// A JSON value as it appears in a message: its kind and (a prefix of) its text.
std::string describe(const json& value) {
  std::string text = value.dump(-1, ' ', false, json::error_handler_t::replace);
  if (text.size() > kMaxShownValueChars) text = text.substr(0, kMaxShownValueChars) + "...";
  if (value.is_string()) return "a string " + text;
  if (value.is_array()) return "an array " + text;
  if (value.is_object()) return "an object " + text;
  if (value.is_boolean()) return "a boolean " + text;
  if (value.is_null()) return "null";
  return text;  // numbers speak for themselves
}

std::string quoted(const std::string& s) {
  return json(s).dump(-1, ' ', false, json::error_handler_t::replace);
}

// Shortest text that reads back as exactly `x` when parsed as a double and rounded to float;
// always with a '.' or an exponent so that it reads as a JSON float ("448.0", not "448").
std::string float_text(float x) {
  std::string s = fmt::format("{}", x);
  if (s.find_first_of(".eE") == std::string::npos) s += ".0";
  return s;
}

// True when a and b are equal or adjacent float32 values: one rounding step apart at most.
bool within_rounding_step(float a, float b) { return a == b || std::nextafter(a, b) == b; }

// ---- hostile-input pre-scan ------------------------------------------------------------------

// Refuses what nlohmann would either take long over or report unclearly: nesting deeper than
// kMaxJsonDepth (checked here so the parser never sees 100000 '['), and the NaN / Infinity
// literals that Python's json module writes for non-finite floats.
void prescan_json(const std::string& text, const std::string& name) {
  int depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\') {
        ++i;  // skip the escaped character (an escaped quote does not end the string)
      } else if (c == '"') {
        in_string = false;
      }
      continue;
    }
    switch (c) {
      case '"':
        in_string = true;
        break;
      case '[':
      case '{':
        if (++depth > kMaxJsonDepth) {
          throw Error(fmt::format("{}: JSON nested deeper than {} levels at {}", name,
                                  kMaxJsonDepth, position_of(text, i)));
        }
        break;
      case ']':
      case '}':
        --depth;
        break;
      case 'N':
      case 'I': {
        for (const char* literal : {"NaN", "Infinity"}) {
          if (text.compare(i, std::strlen(literal), literal) == 0) {
            throw Error(fmt::format(
                "{}: non-finite number '{}' at {} (JSON has no NaN or Infinity; every scale "
                "must be finite and > 0)",
                name, literal, position_of(text, i)));
          }
        }
        break;
      }
      default:
        break;
    }
  }
}

// nlohmann's message without its "[json.exception.parse_error.101] parse error at line 3,
// column 1: " prefix (we give the position ourselves).
std::string json_reason(const json::exception& e) {
  std::string reason = e.what();
  const size_t bracket = reason.find("] ");
  if (bracket != std::string::npos) reason = reason.substr(bracket + 2);
  if (reason.rfind("parse error", 0) == 0) {
    const size_t colon = reason.find(": ");
    if (colon != std::string::npos) reason = reason.substr(colon + 2);
  }
  return reason;
}

json parse_json(const std::string& text, const std::string& name) {
  if (static_cast<int64_t>(text.size()) > kMaxCalibFileBytes) {
    throw Error(fmt::format("{}: {} bytes, larger than the {}-byte limit for a calibration file",
                            name, text.size(), kMaxCalibFileBytes));
  }
  if (text.find_first_not_of(" \t\r\n") == std::string::npos) {
    throw Error(name + ": invalid JSON: the file is empty");
  }
  prescan_json(text, name);
  try {
    return json::parse(text);
  } catch (const json::parse_error& e) {
    throw Error(fmt::format("{}: invalid JSON at {} (byte {}): {}", name,
                            position_of(text, e.byte == 0 ? 0 : e.byte - 1), e.byte,
                            json_reason(e)));
  } catch (const json::out_of_range& e) {
    // nlohmann refuses a number literal that overflows a double (1e999) with error 406.
    throw Error(fmt::format("{}: invalid JSON: a number is not finite: {}", name, json_reason(e)));
  } catch (const json::exception& e) {
    throw Error(fmt::format("{}: invalid JSON: {}", name, json_reason(e)));
  }
}

// ---- field access with messages that name the file and the field --------------------------

class FieldReader {
 public:
  FieldReader(const std::string& name, const json& object, std::string prefix = "")
      : name_(name), object_(object), prefix_(std::move(prefix)) {}

  [[noreturn]] void fail(const std::string& field, const std::string& detail) const {
    throw Error(fmt::format("{}: field '{}{}': {}", name_, prefix_, field, detail));
  }

  bool has(const char* field) const { return object_.contains(field); }

  const json& get(const char* field) const {
    auto it = object_.find(field);
    if (it == object_.end()) {
      throw Error(fmt::format("{}: missing field '{}{}'", name_, prefix_, field));
    }
    return *it;
  }

  std::string string(const char* field) const {
    const json& v = get(field);
    if (!v.is_string()) fail(field, "expected a string, found " + describe(v));
    return v.get<std::string>();
  }

  int integer(const char* field) const { return to_int(get(field), field); }

  // A JSON number (integer or float) as a double.
  double number(const char* field) const {
    const json& v = get(field);
    if (!v.is_number()) fail(field, "expected a number, found " + describe(v));
    return v.get<double>();
  }

  // [rows, columns]: a JSON array of two integers.
  std::pair<int, int> shape(const char* field) const {
    const json& v = get(field);
    if (!v.is_array() || v.size() != 2) {
      fail(field, "expected [int, int], found " + describe(v));
    }
    return {to_int(v[0], field), to_int(v[1], field)};
  }

  // A JSON integer that fits an int; floats (2.0, 2.5) and strings are refused.
  int to_int(const json& v, const char* field) const {
    if (!v.is_number_integer()) fail(field, "expected an integer, found " + describe(v));
    const bool fits = v.is_number_unsigned()
                          ? v.get<uint64_t>() <= uint64_t{std::numeric_limits<int>::max()}
                          : v.get<int64_t>() >= std::numeric_limits<int>::min() &&
                                v.get<int64_t>() <= std::numeric_limits<int>::max();
    if (!fits) fail(field, "expected an integer in int range, found " + describe(v));
    return static_cast<int>(v.get<int64_t>());
  }

  // Reads a [rows, columns] matrix of numbers into `out` (row-major, float32), checking the
  // actual shape against the declared one. Values are range-checked later, as floats.
  void matrix(const char* field, int rows, int columns, std::vector<float>* out) const {
    const json& v = get(field);
    if (!v.is_array()) fail(field, "expected an array of rows, found " + describe(v));
    if (v.size() != static_cast<size_t>(rows)) {
      fail(field, fmt::format("expected {} rows (scales_shape[0]), found {}", rows, v.size()));
    }
    out->clear();
    out->reserve(static_cast<size_t>(rows) * columns);
    for (int r = 0; r < rows; ++r) {
      const json& row = v[r];
      if (!row.is_array()) {
        fail(field, fmt::format("row {}: expected an array, found {}", r, describe(row)));
      }
      if (row.size() != static_cast<size_t>(columns)) {
        fail(field, fmt::format("row {}: expected {} values (scales_shape[1]), found {}", r,
                                columns, row.size()));
      }
      for (int c = 0; c < columns; ++c) {
        const json& x = row[c];
        if (!x.is_number()) {
          fail(field,
               fmt::format("row {}, column {}: expected a number, found {}", r, c, describe(x)));
        }
        // Parsed as double, then rounded once to float: LightLLM writes doubles such as
        // 0.0571986623108387, and our own shortest-float text reads back bit-exact.
        const double value = x.get<double>();
        const float rounded = static_cast<float>(value);
        if (std::isinf(rounded)) {
          fail(field, fmt::format("layer {}, column {}: expected a finite value > 0, found {} "
                                  "(not finite as float32)",
                                  r, c, value));
        }
        out->push_back(rounded);
      }
    }
  }

 private:
  const std::string& name_;
  const json& object_;
  std::string prefix_;
};

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
    throw Error(fmt::format("{}: field 'version': expected {}, found {}", name, quoted(kVersion),
                            quoted(d.version)));
  }
  if (expect.architectures && d.architectures != *expect.architectures) {
    throw Error(fmt::format("{}: field 'architectures': expected {} (the model's), found {}", name,
                            quoted(*expect.architectures), quoted(d.architectures)));
  }
  if (expect.quant_type && d.quant_type != *expect.quant_type) {
    const KvScheme asked =
        *expect.quant_type == QuantType::kPerHead ? KvScheme::kFp8PerHead : KvScheme::kFp8PerTensor;
    throw Error(fmt::format("{}: field 'quant_type': expected \"{}\" (the scheme {}), found \"{}\"",
                            name, quant_type_name(*expect.quant_type), scheme_name(asked),
                            quant_type_name(d.quant_type)));
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

QuantType parse_quant_type(const FieldReader& reader) {
  const std::string text = reader.string("quant_type");
  if (text == quant_type_name(QuantType::kPerHead)) return QuantType::kPerHead;
  if (text == quant_type_name(QuantType::kPerTensor)) return QuantType::kPerTensor;
  reader.fail("quant_type", "expected \"per_head\" or \"per_tensor\", found " + quoted(text));
}

// Reads the whole file; refuses files over the size limit without reading them.
std::string read_file_bounded(const std::string& path) {
  struct stat info;
  if (::stat(path.c_str(), &info) != 0) {
    throw Error(fmt::format("{}: cannot open calibration file: {}", path, std::strerror(errno)));
  }
  if (S_ISDIR(info.st_mode)) {
    throw Error(path + ": cannot open calibration file: it is a directory");
  }
  if (static_cast<int64_t>(info.st_size) > kMaxCalibFileBytes) {
    throw Error(fmt::format("{}: {} bytes, larger than the {}-byte limit for a calibration file",
                            path, static_cast<int64_t>(info.st_size), kMaxCalibFileBytes));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    throw Error(fmt::format("{}: cannot open calibration file: {}", path, std::strerror(errno)));
  }
  // Stop reading once past the limit, in case the file grew (or is not a regular file).
  constexpr size_t kReadChunkBytes = size_t{1} << 16;
  std::string text;
  std::vector<char> buffer(kReadChunkBytes);
  while (in && static_cast<int64_t>(text.size()) <= kMaxCalibFileBytes) {
    in.read(buffer.data(), static_cast<std::streamsize>(buffer.size()));
    text.append(buffer.data(), static_cast<size_t>(in.gcount()));
  }
  if (in.bad()) throw Error(path + ": error while reading the calibration file");
  return text;  // parse_json refuses it if it grew past the limit
}

// ---- atomic write ----------------------------------------------------------------------------

// Writes all of `bytes` to `fd`; false on error (errno set).
bool write_all(int fd, const std::string& bytes) {
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    done += static_cast<size_t>(n);
  }
  return true;
}

std::string parent_dir(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
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
  out += fmt::format("  \"version\": {},\n", quoted(d.version));
  out += fmt::format("  \"architectures\": {},\n", quoted(d.architectures));
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

  const std::string tmp = fmt::format("{}.tmp.{}", path, static_cast<long>(::getpid()));
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    throw Error(
        fmt::format("{}: cannot create temporary file {}: {}", path, tmp, std::strerror(errno)));
  }
  // fsync before rename: otherwise a crash can leave the new name pointing at empty data.
  const bool written = write_all(fd, text) && ::fsync(fd) == 0;
  const int write_errno = errno;
  const bool closed = ::close(fd) == 0;
  if (!written || !closed) {
    ::unlink(tmp.c_str());
    throw Error(fmt::format("{}: cannot write temporary file {}: {}", path, tmp,
                            std::strerror(written ? errno : write_errno)));
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int rename_errno = errno;
    ::unlink(tmp.c_str());
    throw Error(
        fmt::format("{}: cannot rename {} into place: {}", path, tmp, std::strerror(rename_errno)));
  }
  // Make the rename itself durable; a failure here does not undo a complete write.
  const int dir_fd = ::open(parent_dir(path).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd >= 0) {
    ::fsync(dir_fd);
    ::close(dir_fd);
  }
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
