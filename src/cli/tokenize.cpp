// fp8kv tokenize: a file's text -> one line of comma-separated token ids, or (--decode) a line
// of ids -> text, with a Hugging Face tokenizer.json.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "fp8kv/error.h"
#include "fp8kv/tokenizer.h"

namespace fp8kv::cli {

namespace {

std::string read_input(const std::string& path) {
  if (path == "-") {
    return std::string(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": cannot open");
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// "1, 2,3\n" -> {1, 2, 3}: ids separated by commas and/or whitespace.
std::vector<int32_t> parse_id_list(const std::string& text, const std::string& name) {
  std::vector<int32_t> ids;
  size_t i = 0;
  while (i < text.size()) {
    const char c = text[i];
    if (c == ',' || c == ' ' || c == '\t' || c == '\n' || c == '\r') {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < text.size() && text[j] >= '0' && text[j] <= '9') ++j;
    if (j == i || j - i > 10 || std::stoll(text.substr(i, j - i)) > 2147483647LL) {
      const size_t end = text.find_first_of(", \t\r\n", i);
      throw Error(name + ": '" + text.substr(i, std::min<size_t>(end - i, 20)) +
                  "' is not a token id");
    }
    ids.push_back(static_cast<int32_t>(std::stoll(text.substr(i, j - i))));
    i = j;
  }
  return ids;
}

}  // namespace

void add_tokenize(CLI::App& app) {
  struct Opts {
    std::string tokenizer, file;
    bool decode = false;
  };
  auto opt = std::make_shared<Opts>();
  CLI::App* cmd = app.add_subcommand(
      "tokenize",
      "Print the token ids of a file's text (one line, comma separated); --decode: "
      "the way back");
  cmd->add_option("--tokenizer", opt->tokenizer,
                  "A Hugging Face tokenizer.json (byte-level BPE), or a model folder holding one")
      ->required();
  cmd->add_option("file", opt->file, "Text file (- for standard input); with --decode, ids")
      ->required();
  cmd->add_flag("--decode", opt->decode, "Read comma-separated ids, print their text");
  cmd->callback([opt]() {
    const Tokenizer tok = Tokenizer::load(opt->tokenizer);
    const std::string input = read_input(opt->file);
    if (opt->decode) {
      const std::string text = tok.decode(parse_id_list(input, opt->file));
      std::fwrite(text.data(), 1, text.size(), stdout);
      return;
    }
    const std::vector<int32_t> ids = tok.encode(input);
    std::string line;
    for (size_t i = 0; i < ids.size(); ++i) line += (i ? "," : "") + std::to_string(ids[i]);
    std::printf("%s\n", line.c_str());
  });
}

}  // namespace fp8kv::cli
