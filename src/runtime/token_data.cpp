#include "fp8kv/token_data.h"

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "fp8kv/error.h"
#include "fp8kv/tokenizer.h"

namespace fp8kv {

using json = nlohmann::json;

TokenData parse_token_data(const std::string& text, const std::string& name, int vocab_size) {
  TokenData out;
  std::istringstream in(text);
  std::string line;
  int line_no = 0;
  while (std::getline(in, line)) {
    ++line_no;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = name + ":" + std::to_string(line_no);
    json j;
    try {
      j = json::parse(line);
    } catch (const json::exception& e) {
      throw Error(where + ": not valid JSON: " + e.what());
    }
    if (!j.is_object() || !j.contains("input_ids") || !j["input_ids"].is_array()) {
      throw Error(where + ": expected an object with an \"input_ids\" array");
    }
    const json& ids = j["input_ids"];
    if (ids.empty()) throw Error(where + ": \"input_ids\" is empty");
    std::vector<int32_t> seq;
    seq.reserve(ids.size());
    for (size_t i = 0; i < ids.size(); ++i) {
      const json& v = ids[i];
      if (!v.is_number_integer() || v.get<int64_t>() < 0 ||
          (vocab_size > 0 && v.get<int64_t>() >= vocab_size)) {
        throw Error(where + ": input_ids[" + std::to_string(i) + "] = " + v.dump() +
                    " is not a token id in [0, " +
                    (vocab_size > 0 ? std::to_string(vocab_size) : std::string("inf")) + ")");
      }
      seq.push_back(static_cast<int32_t>(v.get<int64_t>()));
    }
    out.push_back(std::move(seq));
  }
  return out;
}

TokenData load_token_data(const std::string& path, int vocab_size) {
  std::ifstream in(path);
  if (!in) throw Error(path + ": cannot open token data");
  std::stringstream ss;
  ss << in.rdbuf();
  TokenData d = parse_token_data(ss.str(), path, vocab_size);
  if (d.empty()) throw Error(path + ": no sequences");
  return d;
}

TokenData chunk_ids(const std::vector<int32_t>& ids, int seq_len) {
  if (seq_len < 2) throw Error("--seq-len " + std::to_string(seq_len) + ": must be at least 2");
  TokenData out;
  for (size_t i = 0; i < ids.size(); i += static_cast<size_t>(seq_len)) {
    const size_t n = std::min(ids.size() - i, static_cast<size_t>(seq_len));
    if (n < 2) break;  // a single token predicts nothing
    out.emplace_back(ids.begin() + static_cast<std::ptrdiff_t>(i),
                     ids.begin() + static_cast<std::ptrdiff_t>(i + n));
  }
  return out;
}

TokenData load_text_data(const std::string& path, const Tokenizer& tok, int seq_len,
                         int vocab_size) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": cannot open text file");
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string content = ss.str();
  std::vector<int32_t> ids;
  const bool jsonl = path.size() >= 6 && path.compare(path.size() - 6, 6, ".jsonl") == 0;
  if (jsonl) {
    std::istringstream lines(content);
    std::string line;
    int line_no = 0;
    while (std::getline(lines, line)) {
      ++line_no;
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      const std::string where = path + ":" + std::to_string(line_no);
      json j;
      try {
        j = json::parse(line);
      } catch (const json::exception& e) {
        throw Error(where + ": not valid JSON: " + e.what());
      }
      if (!j.is_object() || !j.contains("text") || !j["text"].is_string()) {
        throw Error(where + ": expected an object with a \"text\" string");
      }
      const std::vector<int32_t> doc = tok.encode(j["text"].get<std::string>());
      ids.insert(ids.end(), doc.begin(), doc.end());
    }
  } else {
    ids = tok.encode(content);
  }
  for (size_t i = 0; i < ids.size(); ++i) {
    if (vocab_size > 0 && ids[i] >= vocab_size) {
      throw Error(path + ": the tokenizer gave id " + std::to_string(ids[i]) + " (" +
                  tok.token(ids[i]) + "), outside the model's vocabulary of " +
                  std::to_string(vocab_size) + ": a tokenizer of another model?");
    }
  }
  TokenData data = chunk_ids(ids, seq_len);
  if (data.empty()) {
    throw Error(path + ": " + std::to_string(ids.size()) + " tokens of text: too few for a " +
                "sequence (at least 2 needed)");
  }
  return data;
}

void write_token_data(const std::string& path, const TokenData& data) {
  std::ofstream out(path, std::ios::trunc);
  if (!out) throw Error(path + ": cannot create");
  for (const auto& seq : data) out << json{{"input_ids", seq}}.dump() << "\n";
  if (!out) throw Error(path + ": write failed");
}

int64_t count_tokens(const TokenData& data) {
  int64_t n = 0;
  for (const auto& s : data) n += static_cast<int64_t>(s.size());
  return n;
}

}  // namespace fp8kv
