#include "cli/text_input.h"

#include <sys/stat.h>

#include <CLI/CLI.hpp>
#include <cstdio>

#include "fp8kv/error.h"

namespace fp8kv::cli {

void add_tokenizer_option(CLI::App* cmd, std::optional<std::string>& tokenizer) {
  cmd->add_option("--tokenizer", tokenizer,
                  "tokenizer.json (byte-level BPE) for text; default: the model folder's own");
}

void add_data_options(CLI::App* cmd, std::string& data, TextInput& text) {
  cmd->add_option("--data", data, "Token data, JSONL with an input_ids array per line");
  cmd->add_option("--text", text.text,
                  "Text instead of --data: plain text, or JSONL with a \"text\" field per line "
                  "(*.jsonl); tokenized and cut into --seq-len sequences");
  add_tokenizer_option(cmd, text.tokenizer);
  cmd->add_option("--seq-len", text.seq_len, "Tokens per sequence cut from --text")
      ->capture_default_str()
      ->check(CLI::Range(2, 1 << 20));
}

namespace {

// --tokenizer FILE, else MODEL/tokenizer.json; Error when neither is given or there.
std::string tokenizer_path(const std::optional<std::string>& given, const std::string& model_dir,
                           const std::string& why) {
  if (given) return *given;
  const std::string own =
      model_dir + (model_dir.empty() || model_dir.back() == '/' ? "" : "/") + "tokenizer.json";
  struct stat st {};
  if (::stat(own.c_str(), &st) != 0) {
    throw Error(why + " needs a tokenizer: " + own +
                " does not exist; pass --tokenizer FILE (a Hugging Face tokenizer.json)");
  }
  return own;
}

}  // namespace

Tokenizer load_tokenizer(const std::optional<std::string>& given, const std::string& model_dir,
                         const std::string& why) {
  return Tokenizer::load(tokenizer_path(given, model_dir, why));
}

void check_data_choice(const std::string& data, const TextInput& text,
                       const std::string& model_dir) {
  if (data.empty() == !text.text) {
    throw Error(data.empty() ? "give --data FILE (token ids) or --text FILE (text)"
                             : "--data and --text: give one of them, not both");
  }
  if (text.tokenizer && !text.text) throw Error("--tokenizer is for --text");
  if (text.text) tokenizer_path(text.tokenizer, model_dir, "--text");
}

TokenData load_data(const std::string& data, const TextInput& text, const std::string& model_dir,
                    int vocab_size, bool verbose) {
  check_data_choice(data, text, model_dir);
  if (!text.text) return load_token_data(data, vocab_size);
  const Tokenizer tok = load_tokenizer(text.tokenizer, model_dir, "--text");
  TokenData d = load_text_data(*text.text, tok, text.seq_len, vocab_size);
  if (verbose) {
    std::printf("%s: %lld tokens in %zu sequences of up to %d\n", text.text->c_str(),
                static_cast<long long>(count_tokens(d)), d.size(), text.seq_len);
    std::fflush(stdout);
  }
  return d;
}

}  // namespace fp8kv::cli
