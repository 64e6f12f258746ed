#include "fp8kv/token_data.h"

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "fp8kv/error.h"

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
