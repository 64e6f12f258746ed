// Hostile-input JSON reading and atomic file writing, shared by the readers of every scale
// format (kv_cache_calib.json, the quant-param JSON, config.json entries) so that each one has
// the same discipline: a size cap before anything is read, a nesting cap before the parser runs,
// the file, the field and the value named in every refusal, and no partial output file.
// Internal to the library (core layer); not installed.
#pragma once

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "fp8kv/error.h"

namespace fp8kv::detail {

using nlohmann::json;

// Hostile-input bounds, checked before any text reaches the JSON parser. A real file is a few
// KB (64 layers x 64 heads of scales is ~100 KB), so these leave room for any model.
constexpr int64_t kMaxCalibFileBytes = int64_t{64} << 20;  // 64 MiB
constexpr int kMaxJsonDepth = 64;                          // nesting of [ and {
constexpr size_t kMaxShownValueChars = 48;                 // how much of a bad value to quote

// ---- messages --------------------------------------------------------------------------------

// Said by every reader that refuses per_head scales for fp8-per-tensor: the reduction they need
// is lossy for the heads with smaller scales, so it is the user's explicit step.
// `file` is the scales' path ("FILE" where the caller has none).
inline std::string per_head_for_per_tensor_hint(const std::string& file) {
  return fmt::format(
      "fp8-per-tensor reads one K and one V scale per layer: `fp8kv convert {} OUT --to lightllm "
      "--reduce max` writes a per_tensor file of each layer's max over its KV heads (or calibrate "
      "with --scheme per-tensor)",
      file);
}

// 1-based line and column of byte `offset` in `text`.
inline std::string position_of(const std::string& text, size_t offset) {
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
inline std::string describe(const json& value) {
  std::string text = value.dump(-1, ' ', false, json::error_handler_t::replace);
  if (text.size() > kMaxShownValueChars) text = text.substr(0, kMaxShownValueChars) + "...";
  if (value.is_string()) return "a string " + text;
  if (value.is_array()) return "an array " + text;
  if (value.is_object()) return "an object " + text;
  if (value.is_boolean()) return "a boolean " + text;
  if (value.is_null()) return "null";
  return text;  // numbers speak for themselves
}

inline std::string json_quoted(const std::string& s) {
  return json(s).dump(-1, ' ', false, json::error_handler_t::replace);
}

// Shortest text that reads back as exactly `x` when parsed as a double and rounded to float;
// always with a '.' or an exponent so that it reads as a JSON float ("448.0", not "448").
inline std::string float_text(float x) {
  std::string s = fmt::format("{}", x);
  if (s.find_first_of(".eE") == std::string::npos) s += ".0";
  return s;
}

// True when a and b are equal or adjacent float32 values: one rounding step apart at most.
inline bool within_rounding_step(float a, float b) { return a == b || std::nextafter(a, b) == b; }

// ---- hostile-input pre-scan ------------------------------------------------------------------

// Refuses what nlohmann would either take long over or report unclearly: nesting deeper than
// kMaxJsonDepth (checked here so the parser never sees 100000 '['), and the NaN / Infinity
// literals that Python's json module writes for non-finite floats.
inline void prescan_json(const std::string& text, const std::string& name) {
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
inline std::string json_reason(const json::exception& e) {
  std::string reason = e.what();
  const size_t bracket = reason.find("] ");
  if (bracket != std::string::npos) reason = reason.substr(bracket + 2);
  if (reason.rfind("parse error", 0) == 0) {
    const size_t colon = reason.find(": ");
    if (colon != std::string::npos) reason = reason.substr(colon + 2);
  }
  return reason;
}

inline json parse_json(const std::string& text, const std::string& name) {
  if (static_cast<int64_t>(text.size()) > kMaxCalibFileBytes) {
    throw Error(fmt::format("{}: {} bytes, larger than the {}-byte limit for a calibration file",
                            name, text.size(), kMaxCalibFileBytes));
  }
  if (text.find_first_not_of(" \t\r\n") == std::string::npos) {
    throw Error(name + ": invalid JSON: the file is empty");
  }
  prescan_json(text, name);
  // A key twice in one object would otherwise keep its last value silently: refuse it.
  std::vector<std::set<std::string>> keys;  // the keys seen so far, one entry per open object
  std::string duplicate;
  const json::parser_callback_t watch = [&](int, json::parse_event_t event, json& parsed) {
    if (event == json::parse_event_t::object_start) keys.emplace_back();
    if (event == json::parse_event_t::object_end && !keys.empty()) keys.pop_back();
    if (event == json::parse_event_t::key && !keys.empty() && duplicate.empty()) {
      const std::string key = parsed.get<std::string>();
      if (!keys.back().insert(key).second) duplicate = key;
    }
    return true;
  };
  try {
    json parsed = json::parse(text, watch);
    if (!duplicate.empty()) {
      throw Error(fmt::format("{}: invalid JSON: key {} appears twice in one object", name,
                              json_quoted(duplicate)));
    }
    return parsed;
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

// Reads the whole file; refuses files over the size limit without reading them.
inline std::string read_file_bounded(const std::string& path) {
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
inline bool write_all(int fd, const std::string& bytes) {
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

inline std::string parent_dir(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

// Writes `text` to `path` atomically: a temporary file in the same folder, fsync, rename. An
// interrupted or refused write leaves any old file intact and no temporary behind.
inline void write_text_atomic(const std::string& path, const std::string& text) {
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

}  // namespace fp8kv::detail
