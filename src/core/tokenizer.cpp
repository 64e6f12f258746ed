// Byte-level BPE from a Hugging Face tokenizer.json. The pipeline, in the order `tokenizers`
// runs it: added tokens split out -> normalizer -> pre-tokenizer (Split regex pieces, then the
// ByteLevel byte-to-unicode map) -> BPE merges by rank -> ids. Regexes run in PCRE2 with UTF and
// UCP, so \p{L}, \p{N} and \s are the Unicode classes the Oniguruma regexes of `tokenizers` use.
#include "fp8kv/tokenizer.h"

#include <sys/stat.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>
#include <unordered_map>

#include "fp8kv/error.h"

#if defined(FP8KV_HAVE_PCRE2)
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#endif
#if defined(FP8KV_HAVE_UNISTRING)
#include <uninorm.h>
#endif

namespace fp8kv {

using json = nlohmann::json;

namespace {

// The regex of GPT-2's ByteLevel pre-tokenizer (use_regex: true).
constexpr const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// Length in bytes of the UTF-8 character that starts with `lead` (valid UTF-8 assumed).
size_t utf8_len(unsigned char lead) {
  return lead < 0x80 ? 1 : lead < 0xE0 ? 2 : lead < 0xF0 ? 3 : 4;
}

// GPT-2's byte-to-unicode map: printable Latin-1 bytes stand for themselves, the other 68
// (controls, space, 0x7F-0xA0, 0xAD) are moved to U+0100.. in byte order, so every byte is one
// visible character and a token string never holds a raw space.
std::array<std::string, 256> byte_to_unicode() {
  std::array<std::string, 256> map;
  uint32_t next = 256;
  for (int b = 0; b < 256; ++b) {
    const bool keep = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
    append_utf8(map[b], keep ? static_cast<uint32_t>(b) : next++);
  }
  return map;
}

bool is_ascii_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

#if defined(FP8KV_HAVE_PCRE2)
struct Pcre2CodeDeleter {
  void operator()(pcre2_code* c) const { pcre2_code_free(c); }
};
using Regex = std::shared_ptr<pcre2_code>;
#else
using Regex = std::shared_ptr<void>;
#endif

// One pre-tokenizer step.
struct PreStep {
  enum class Kind { kSplit, kByteLevel } kind = Kind::kSplit;
  Regex regex;                    // kSplit; kByteLevel with use_regex (the GPT-2 pattern)
  bool add_prefix_space = false;  // kByteLevel
};

// `tokenizers` runs its regexes in Oniguruma, whose \s is Unicode's White_Space. PCRE2's \s under
// UCP is Perl's space, the same set plus U+180E (MONGOLIAN VOWEL SEPARATOR, White_Space until
// Unicode 6.3). So U+180E is taken out of every \s (and put into every \S): \s -> (?:(?!X)\s),
// \S -> (?:X|\S), a class with \s -> (?:(?!X)[...]), a negated one -> (?:X|[^...]), X = U+180E.
std::string oniguruma_whitespace(const std::string& pattern) {
  static const std::string kX = "\\x{180E}";
  std::string out;
  for (size_t i = 0; i < pattern.size(); ++i) {
    const char c = pattern[i];
    if (c == '\\' && i + 1 < pattern.size()) {
      const char e = pattern[++i];
      if (e == 's') {
        out += "(?:(?!" + kX + ")\\s)";
      } else if (e == 'S') {
        out += "(?:" + kX + "|\\S)";
      } else {
        out += c;
        out += e;
      }
      continue;
    }
    if (c != '[') {
      out += c;
      continue;
    }
    // A character class: up to the first unescaped ']' that is not its first member.
    size_t j = i + 1;
    const bool negated = j < pattern.size() && pattern[j] == '^';
    if (negated) ++j;
    if (j < pattern.size() && pattern[j] == ']') ++j;
    bool has_s = false;
    while (j < pattern.size() && pattern[j] != ']') {
      if (pattern[j] == '\\' && j + 1 < pattern.size()) {
        has_s = has_s || pattern[j + 1] == 's';
        ++j;
      }
      ++j;
    }
    const std::string cls = pattern.substr(i, j + 1 - i);
    if (!has_s) {
      out += cls;
    } else if (negated) {
      out += "(?:" + kX + "|" + cls + ")";
    } else {
      out += "(?:(?!" + kX + ")" + cls + ")";
    }
    i = j;
  }
  return out;
}

Regex compile_regex(const std::string& given, bool literal, const std::string& where) {
#if defined(FP8KV_HAVE_PCRE2)
  int err = 0;
  PCRE2_SIZE offset = 0;
  const uint32_t options = PCRE2_UTF | PCRE2_UCP | (literal ? PCRE2_LITERAL : 0);
  const std::string pattern = literal ? given : oniguruma_whitespace(given);
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                   options, &err, &offset, nullptr);
  if (code == nullptr) {
    PCRE2_UCHAR message[256];
    pcre2_get_error_message(err, message, sizeof message);
    throw Error(where + ": regex " + json(given).dump() + " does not compile at offset " +
                std::to_string(offset) + ": " + reinterpret_cast<const char*>(message));
  }
  pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);  // best effort: pcre2_match interprets otherwise
  return Regex(code, Pcre2CodeDeleter());
#else
  (void)given;
  (void)literal;
  throw Error(where + ": this fp8kv was built without PCRE2 (Debian libpcre2-dev), which the " +
              "tokenizer's regexes need; install it (scripts/setup) and rebuild");
#endif
}

// Splits each piece at the matches of `re`, keeping matches and the text between them as pieces
// (the "Isolated" behavior). Empty pieces are dropped.
std::vector<std::string> split_isolated(const std::vector<std::string>& pieces, const Regex& re) {
  std::vector<std::string> out;
#if defined(FP8KV_HAVE_PCRE2)
  pcre2_match_data* md = pcre2_match_data_create_from_pattern(re.get(), nullptr);
  if (md == nullptr) throw Error("tokenizer: out of memory for regex match data");
  for (const std::string& s : pieces) {
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(s.data());
    size_t pos = 0, gap_start = 0;
    while (pos <= s.size()) {
      const int rc = pcre2_match(re.get(), subject, s.size(), pos, PCRE2_NO_UTF_CHECK, md, nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) {
        pcre2_match_data_free(md);
        PCRE2_UCHAR message[256];
        pcre2_get_error_message(rc, message, sizeof message);
        throw Error(std::string("tokenizer: regex match failed: ") +
                    reinterpret_cast<const char*>(message));
      }
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
      const size_t b = ov[0], e = ov[1];
      if (e == b) {  // an empty match splits nothing; try again one character on
        if (b >= s.size()) break;
        pos = b + utf8_len(static_cast<unsigned char>(s[b]));
        continue;
      }
      if (b > gap_start) out.push_back(s.substr(gap_start, b - gap_start));
      out.push_back(s.substr(b, e - b));
      pos = gap_start = e;
    }
    if (gap_start < s.size()) out.push_back(s.substr(gap_start));
  }
  pcre2_match_data_free(md);
#else
  (void)pieces;
  (void)re;
#endif
  return out;
}

struct AddedToken {
  std::string content;
  int32_t id = 0;
  bool lstrip = false, rstrip = false;
};

// o[key] when it is a boolean; false when absent or null.
bool flag(const json& o, const char* key) {
  return o.contains(key) && o[key].is_boolean() && o[key].get<bool>();
}

// o["type"] when it is a string; "" otherwise.
std::string type_of(const json& o) {
  return o.is_object() && o.contains("type") && o["type"].is_string() ? o["type"].get<std::string>()
                                                                      : std::string();
}

std::string describe(const json& j) {
  std::string s = j.dump();
  return s.size() > 80 ? s.substr(0, 77) + "..." : s;
}

}  // namespace

std::string sanitize_utf8(const std::string& bytes) {
  static const std::string kReplacement = "\xEF\xBF\xBD";
  std::string out;
  out.reserve(bytes.size());
  const size_t n = bytes.size();
  auto at = [&](size_t i) { return static_cast<unsigned char>(bytes[i]); };
  size_t i = 0;
  while (i < n) {
    const unsigned char b = at(i);
    if (b < 0x80) {
      out += static_cast<char>(b);
      ++i;
      continue;
    }
    // Well-formed sequences (Unicode Table 3-7): the length and the second byte's range.
    size_t len = 0;
    unsigned char lo = 0x80, hi = 0xBF;
    if (b >= 0xC2 && b <= 0xDF) {
      len = 2;
    } else if (b >= 0xE0 && b <= 0xEF) {
      len = 3;
      if (b == 0xE0) lo = 0xA0;
      if (b == 0xED) hi = 0x9F;
    } else if (b >= 0xF0 && b <= 0xF4) {
      len = 4;
      if (b == 0xF0) lo = 0x90;
      if (b == 0xF4) hi = 0x8F;
    }
    if (len == 0 || i + 1 >= n || at(i + 1) < lo || at(i + 1) > hi) {
      out += kReplacement;  // a lone invalid byte, or a lead byte without a valid second byte
      ++i;
      continue;
    }
    size_t k = i + 2;
    while (k < i + len && k < n && at(k) >= 0x80 && at(k) <= 0xBF) ++k;
    if (k == i + len) {
      out.append(bytes, i, len);
    } else {
      out += kReplacement;  // one U+FFFD for the maximal valid prefix
    }
    i = k;
  }
  return out;
}

struct Tokenizer::Impl {
  std::string name;
  bool nfc = false;
  std::vector<PreStep> steps;
  std::unordered_map<std::string, int32_t> vocab;
  // (left id << 32 | right id) -> (rank, merged id)
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges;
  bool ignore_merges = false;
  int32_t unk_id = -1;
  std::vector<AddedToken> added;
  std::array<std::vector<size_t>, 256> added_by_first_byte;  // indices into `added`
  std::vector<std::string> id_to_token;                      // [vocab_size]; "" for no token
  std::array<std::string, 256> byte_map;
  std::unordered_map<std::string, uint8_t> unicode_to_byte;

  void bpe(const std::string& word, std::vector<int32_t>& ids,
           std::unordered_map<std::string, std::vector<int32_t>>& cache) const;
  void encode_plain(const std::string& text, std::vector<int32_t>& ids,
                    std::unordered_map<std::string, std::vector<int32_t>>& cache) const;
};

// One pre-token (already byte-level mapped) -> ids, merging the lowest-ranked adjacent pair
// first (leftmost on a tie), as `tokenizers`' BPE does.
void Tokenizer::Impl::bpe(const std::string& word, std::vector<int32_t>& ids,
                          std::unordered_map<std::string, std::vector<int32_t>>& cache) const {
  const auto hit = cache.find(word);
  if (hit != cache.end()) {
    ids.insert(ids.end(), hit->second.begin(), hit->second.end());
    return;
  }
  std::vector<int32_t> syms;
  if (ignore_merges) {
    const auto whole = vocab.find(word);
    if (whole != vocab.end()) syms.push_back(whole->second);
  }
  if (syms.empty()) {
    for (size_t i = 0; i < word.size();) {
      const size_t len = utf8_len(static_cast<unsigned char>(word[i]));
      const auto it = vocab.find(word.substr(i, len));
      // Load checked that all 256 byte characters are in the vocabulary unless there is an
      // unk_token, so a miss here can only be an unknown character that maps to it.
      syms.push_back(it != vocab.end() ? it->second : unk_id);
      i += len;
    }
    while (syms.size() > 1) {
      int32_t best_rank = std::numeric_limits<int32_t>::max(), best_id = -1;
      size_t best_pos = 0;
      for (size_t i = 0; i + 1 < syms.size(); ++i) {
        const uint64_t key = (static_cast<uint64_t>(static_cast<uint32_t>(syms[i])) << 32) |
                             static_cast<uint32_t>(syms[i + 1]);
        const auto m = merges.find(key);
        if (m != merges.end() && m->second.first < best_rank) {
          best_rank = m->second.first;
          best_id = m->second.second;
          best_pos = i;
        }
      }
      if (best_id < 0) break;
      syms[best_pos] = best_id;
      syms.erase(syms.begin() + static_cast<std::ptrdiff_t>(best_pos) + 1);
    }
  }
  if (cache.size() < (1u << 16)) cache.emplace(word, syms);
  ids.insert(ids.end(), syms.begin(), syms.end());
}

// Text between added tokens: normalize, pre-tokenize, BPE.
void Tokenizer::Impl::encode_plain(
    const std::string& text, std::vector<int32_t>& ids,
    std::unordered_map<std::string, std::vector<int32_t>>& cache) const {
  if (text.empty()) return;
  std::string normalized = text;
#if defined(FP8KV_HAVE_UNISTRING)
  if (nfc) {
    size_t len = 0;
    uint8_t* r = u8_normalize(UNINORM_NFC, reinterpret_cast<const uint8_t*>(text.data()),
                              text.size(), nullptr, &len);
    if (r == nullptr) throw Error(name + ": NFC normalization failed");
    normalized.assign(reinterpret_cast<const char*>(r), len);
    std::free(r);
  }
#endif
  std::vector<std::string> pieces = {normalized};
  for (const PreStep& step : steps) {
    if (step.kind == PreStep::Kind::kSplit) {
      pieces = split_isolated(pieces, step.regex);
      continue;
    }
    if (step.add_prefix_space) {
      for (std::string& p : pieces) {
        if (p.empty() || p[0] != ' ') p.insert(p.begin(), ' ');
      }
    }
    if (step.regex) pieces = split_isolated(pieces, step.regex);
    for (std::string& p : pieces) {
      std::string mapped;
      mapped.reserve(p.size() * 2);
      for (char c : p) mapped += byte_map[static_cast<unsigned char>(c)];
      p = std::move(mapped);
    }
  }
  for (const std::string& p : pieces) bpe(p, ids, cache);
}

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::load(const std::string& path) {
  std::string file = path;
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) {
    file = path + (path.empty() || path.back() != '/' ? "/" : "") + "tokenizer.json";
  }
  std::ifstream in(file, std::ios::binary);
  if (!in) throw Error(file + ": cannot open tokenizer file");
  std::stringstream ss;
  ss << in.rdbuf();
  return parse(ss.str(), file);
}

// A field of an unexpected JSON type that the checks below miss still becomes an Error that
// names the file (the function-try-block).
Tokenizer Tokenizer::parse(const std::string& json_text, const std::string& name) try {
  auto impl = std::make_unique<Impl>();
  impl->name = name;
  impl->byte_map = byte_to_unicode();
  for (int b = 0; b < 256; ++b) impl->unicode_to_byte[impl->byte_map[b]] = static_cast<uint8_t>(b);

  json j;
  try {
    j = json::parse(json_text);
  } catch (const json::exception& e) {
    throw Error(name + ": not valid JSON (truncated?): " + e.what());
  }
  if (!j.is_object()) throw Error(name + ": expected a JSON object (a tokenizer.json)");

  // ---- model: BPE with vocab and merges
  if (!j.contains("model") || !j["model"].is_object()) {
    throw Error(name + ": no \"model\" object: not a Hugging Face tokenizer.json");
  }
  const json& model = j["model"];
  const std::string type =
      model.contains("type") ? type_of(model) : (model.contains("merges") ? "BPE" : "");
  if (type != "BPE") {
    throw Error(name + ": model type " + json(type).dump() +
                " is not supported (fp8kv reads byte-level BPE tokenizers)");
  }
  if (!model.contains("vocab") || !model["vocab"].is_object()) {
    throw Error(name + ": model has no \"vocab\" object");
  }
  if (!model.contains("merges") || !model["merges"].is_array()) {
    throw Error(name + ": model has no \"merges\" array");
  }
  auto refuse_if_set = [&](const char* field, bool set) {
    if (set) {
      throw Error(name + ": model." + field + " = " + describe(model[field]) +
                  " is not supported (byte-level BPE uses none)");
    }
  };
  auto set_string = [&](const char* f) {
    return model.contains(f) && !model[f].is_null() &&
           !(model[f].is_string() && model[f].get<std::string>().empty());
  };
  refuse_if_set("continuing_subword_prefix", set_string("continuing_subword_prefix"));
  refuse_if_set("end_of_word_suffix", set_string("end_of_word_suffix"));
  refuse_if_set("byte_fallback", flag(model, "byte_fallback"));
  refuse_if_set("dropout", model.contains("dropout") && !model["dropout"].is_null() &&
                               !(model["dropout"].is_number() && model["dropout"] == 0));
  impl->ignore_merges = flag(model, "ignore_merges");

  int32_t max_id = -1;
  auto note_id = [&](const std::string& where, const json& v) {
    if (!v.is_number_integer() || v.get<int64_t>() < 0 ||
        v.get<int64_t>() > std::numeric_limits<int32_t>::max()) {
      throw Error(name + ": " + where + " = " + describe(v) + " is not a token id");
    }
    const auto id = static_cast<int32_t>(v.get<int64_t>());
    max_id = std::max(max_id, id);
    return id;
  };
  for (const auto& [tok, v] : model["vocab"].items()) {
    impl->vocab[tok] = note_id("model.vocab[" + json(tok).dump() + "]", v);
  }
  if (set_string("unk_token")) {
    const std::string unk = model["unk_token"].get<std::string>();
    const auto it = impl->vocab.find(unk);
    if (it == impl->vocab.end()) {
      throw Error(name + ": model.unk_token " + json(unk).dump() + " is not in the vocabulary");
    }
    impl->unk_id = it->second;
  } else {
    for (int b = 0; b < 256; ++b) {
      if (impl->vocab.count(impl->byte_map[b]) == 0) {
        char hex[8];
        std::snprintf(hex, sizeof hex, "0x%02X", b);
        throw Error(name + ": byte " + hex + " (token " + json(impl->byte_map[b]).dump() +
                    ") is not in the vocabulary and the model has no unk_token: not a "
                    "byte-level BPE vocabulary");
      }
    }
  }
  const json& merges = model["merges"];
  for (size_t r = 0; r < merges.size(); ++r) {
    const json& m = merges[r];
    const std::string where = "model.merges[" + std::to_string(r) + "]";
    std::string a, b;
    if (m.is_string()) {  // "a b"
      const std::string s = m.get<std::string>();
      const size_t sp = s.find(' ');
      if (sp == std::string::npos || sp == 0 || sp + 1 >= s.size() ||
          s.find(' ', sp + 1) != std::string::npos) {
        throw Error(name + ": " + where + " = " + describe(m) + ": expected \"left right\"");
      }
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      a = m[0].get<std::string>();
      b = m[1].get<std::string>();
    } else {
      throw Error(name + ": " + where + " = " + describe(m) +
                  ": expected \"left right\" or [\"left\", \"right\"]");
    }
    const auto ia = impl->vocab.find(a), ib = impl->vocab.find(b), im = impl->vocab.find(a + b);
    for (const auto& [part, it] : {std::pair{a, ia}, std::pair{b, ib}, std::pair{a + b, im}}) {
      if (it == impl->vocab.end()) {
        throw Error(name + ": " + where + " = " + describe(m) + ": " + json(part).dump() +
                    " is not in the vocabulary");
      }
    }
    const uint64_t key = (static_cast<uint64_t>(static_cast<uint32_t>(ia->second)) << 32) |
                         static_cast<uint32_t>(ib->second);
    impl->merges.emplace(key, std::pair{static_cast<int32_t>(r), im->second});  // first rank wins
  }

  // ---- added tokens
  if (j.contains("added_tokens") && !j["added_tokens"].is_null()) {
    if (!j["added_tokens"].is_array()) throw Error(name + ": \"added_tokens\" is not an array");
    const json& at = j["added_tokens"];
    for (size_t i = 0; i < at.size(); ++i) {
      const std::string where = "added_tokens[" + std::to_string(i) + "]";
      const json& t = at[i];
      if (!t.is_object() || !t.contains("content") || !t["content"].is_string() ||
          !t.contains("id")) {
        throw Error(name + ": " + where + ": expected an object with \"id\" and \"content\"");
      }
      AddedToken a;
      a.content = t["content"].get<std::string>();
      a.id = note_id(where + ".id", t["id"]);
      a.lstrip = flag(t, "lstrip");
      a.rstrip = flag(t, "rstrip");
      if (a.content.empty()) throw Error(name + ": " + where + ": empty \"content\"");
      if (flag(t, "single_word")) {
        throw Error(name + ": " + where + " (" + json(a.content).dump() +
                    "): single_word = true is not supported");
      }
      impl->added.push_back(a);
    }
    for (size_t i = 0; i < impl->added.size(); ++i) {
      impl->added_by_first_byte[static_cast<unsigned char>(impl->added[i].content[0])].push_back(i);
    }
  }

  // ---- normalizer: none or NFC
  auto normalizer_step = [&](const json& n, const std::string& where) {
    const std::string t = type_of(n);
    if (t == "NFC") {
#if defined(FP8KV_HAVE_UNISTRING)
      impl->nfc = true;
#else
      throw Error(name + ": " + where +
                  " NFC: this fp8kv was built without libunistring "
                  "(Debian libunistring-dev); install it (scripts/setup) and rebuild");
#endif
    } else {
      throw Error(name + ": " + where + " type " + json(t).dump() +
                  " is not supported (fp8kv reads none or NFC)");
    }
  };
  if (j.contains("normalizer") && !j["normalizer"].is_null()) {
    const json& n = j["normalizer"];
    if (!n.is_object()) throw Error(name + ": \"normalizer\" is not an object");
    if (type_of(n) == "Sequence") {
      const json list = n.contains("normalizers") && n["normalizers"].is_array() ? n["normalizers"]
                                                                                 : json::array();
      for (size_t i = 0; i < list.size(); ++i) {
        normalizer_step(list[i], "normalizer.normalizers[" + std::to_string(i) + "]");
      }
    } else {
      normalizer_step(n, "normalizer");
    }
  }

  // ---- pre-tokenizer: Split (Isolated) steps, then ByteLevel
  if (!j.contains("pre_tokenizer") || j["pre_tokenizer"].is_null()) {
    throw Error(name +
                ": no \"pre_tokenizer\": a byte-level BPE tokenizer needs a ByteLevel "
                "pre-tokenizer");
  }
  auto add_step = [&](const json& p, const std::string& where) {
    if (!p.is_object()) throw Error(name + ": " + where + " is not an object");
    const std::string t = type_of(p);
    PreStep step;
    if (t == "Split") {
      if (!p.contains("pattern") || !p["pattern"].is_object()) {
        throw Error(name + ": " + where + ": Split has no \"pattern\" object");
      }
      const json& pat = p["pattern"];
      const bool is_regex = pat.contains("Regex") && pat["Regex"].is_string();
      const bool is_string = pat.contains("String") && pat["String"].is_string();
      if (!is_regex && !is_string) {
        throw Error(name + ": " + where + ".pattern = " + describe(pat) +
                    ": expected {\"Regex\": ...} or {\"String\": ...}");
      }
      const std::string behavior = p.contains("behavior") && p["behavior"].is_string()
                                       ? p["behavior"].get<std::string>()
                                       : "";
      if (behavior != "Isolated") {
        throw Error(name + ": " + where + ": Split behavior " + json(behavior).dump() +
                    " is not supported (fp8kv reads \"Isolated\")");
      }
      if (flag(p, "invert")) {
        throw Error(name + ": " + where + ": Split invert = true is not supported");
      }
      step.kind = PreStep::Kind::kSplit;
      step.regex = compile_regex(pat[is_regex ? "Regex" : "String"].get<std::string>(), !is_regex,
                                 name + ": " + where);
    } else if (t == "ByteLevel") {
      step.kind = PreStep::Kind::kByteLevel;
      step.add_prefix_space = flag(p, "add_prefix_space");
      if (!p.contains("use_regex") || flag(p, "use_regex")) {
        step.regex = compile_regex(kGpt2Pattern, false, name + ": " + where);
      }
    } else {
      throw Error(name + ": " + where + " type " + json(t).dump() +
                  " is not supported (fp8kv reads Split, ByteLevel, or a Sequence of them)");
    }
    impl->steps.push_back(step);
  };
  const json& pre = j["pre_tokenizer"];
  if (type_of(pre) == "Sequence") {
    if (!pre.contains("pretokenizers") || !pre["pretokenizers"].is_array()) {
      throw Error(name + ": pre_tokenizer Sequence has no \"pretokenizers\" array");
    }
    const json& list = pre["pretokenizers"];
    for (size_t i = 0; i < list.size(); ++i) {
      add_step(list[i], "pre_tokenizer.pretokenizers[" + std::to_string(i) + "]");
    }
  } else {
    add_step(pre, "pre_tokenizer");
  }
  const auto byte_level =
      std::find_if(impl->steps.begin(), impl->steps.end(),
                   [](const PreStep& s) { return s.kind == PreStep::Kind::kByteLevel; });
  if (byte_level == impl->steps.end() || byte_level + 1 != impl->steps.end()) {
    throw Error(name +
                ": the pre-tokenizer must end with one ByteLevel step (and have no "
                "other): this is not a byte-level BPE tokenizer");
  }

  // ---- decoder: ByteLevel (or none: decode() does the ByteLevel decoding either way)
  if (j.contains("decoder") && !j["decoder"].is_null()) {
    const std::string t = type_of(j["decoder"]);
    if (t != "ByteLevel") {
      throw Error(name + ": decoder type " + json(t).dump() +
                  " is not supported (fp8kv decodes ByteLevel)");
    }
  }

  impl->id_to_token.assign(static_cast<size_t>(max_id) + 1, std::string());
  for (const auto& [tok, id] : impl->vocab) impl->id_to_token[id] = tok;
  for (const AddedToken& a : impl->added) impl->id_to_token[a.id] = a.content;
  if (max_id < 0) throw Error(name + ": the vocabulary is empty");
  return Tokenizer(std::move(impl));
} catch (const json::exception& e) {
  throw Error(name + ": unexpected content: " + e.what());
}

std::vector<int32_t> Tokenizer::encode(const std::string& input) const {
  const Impl& t = *impl_;
  const std::string text = sanitize_utf8(input);
  std::vector<int32_t> ids;
  std::unordered_map<std::string, std::vector<int32_t>> cache;
  size_t plain_start = 0;  // start of the text not yet encoded
  size_t i = 0;
  while (i < text.size()) {
    // Leftmost-longest match of an added token at i.
    const AddedToken* best = nullptr;
    for (size_t k : t.added_by_first_byte[static_cast<unsigned char>(text[i])]) {
      const AddedToken& a = t.added[k];
      if (text.compare(i, a.content.size(), a.content) == 0 &&
          (best == nullptr || a.content.size() > best->content.size())) {
        best = &a;
      }
    }
    if (best == nullptr) {
      ++i;
      continue;
    }
    size_t begin = i, end = i + best->content.size();
    if (best->lstrip) {
      while (begin > plain_start && is_ascii_space(text[begin - 1])) --begin;
    }
    if (best->rstrip) {
      while (end < text.size() && is_ascii_space(text[end])) ++end;
    }
    t.encode_plain(text.substr(plain_start, begin - plain_start), ids, cache);
    ids.push_back(best->id);
    plain_start = i = end;
  }
  t.encode_plain(text.substr(plain_start), ids, cache);
  return ids;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  const Impl& t = *impl_;
  std::string bytes;
  for (size_t k = 0; k < ids.size(); ++k) {
    const int32_t id = ids[k];
    if (id < 0 || id >= vocab_size() || t.id_to_token[id].empty()) {
      throw Error("decode: ids[" + std::to_string(k) + "] = " + std::to_string(id) +
                  " is not a token of " + t.name);
    }
    // ByteLevel decoding, as `tokenizers` does it: a token whose every character is a
    // byte-level character gives those bytes; any other token (an added token such as "<s> ")
    // gives its own UTF-8.
    const std::string& tok = t.id_to_token[id];
    std::string mapped;
    bool all_mapped = true;
    for (size_t i = 0; i < tok.size() && all_mapped;) {
      const size_t len = utf8_len(static_cast<unsigned char>(tok[i]));
      const auto it = t.unicode_to_byte.find(tok.substr(i, len));
      if (it == t.unicode_to_byte.end()) {
        all_mapped = false;
      } else {
        mapped += static_cast<char>(it->second);
      }
      i += len;
    }
    bytes += all_mapped ? mapped : tok;
  }
  return sanitize_utf8(bytes);
}

int Tokenizer::vocab_size() const { return static_cast<int>(impl_->id_to_token.size()); }

std::string Tokenizer::token(int32_t id) const {
  if (id < 0 || id >= vocab_size()) return "";
  return impl_->id_to_token[id];
}

}  // namespace fp8kv
