// Text in and out for the model commands: --data / --text / --tokenizer / --seq-len, and the
// tokenizer of a model folder.
#pragma once

#include <optional>
#include <string>

#include "fp8kv/token_data.h"
#include "fp8kv/tokenizer.h"

namespace CLI {
class App;
}  // namespace CLI

namespace fp8kv::cli {

struct TextInput {
  std::optional<std::string> text;       // --text FILE
  std::optional<std::string> tokenizer;  // --tokenizer FILE (default: MODEL/tokenizer.json)
  int seq_len = 512;                     // --seq-len
};

// Adds `--data FILE` (token ids) and `--text FILE` with `--tokenizer` and `--seq-len`; the
// command needs exactly one of --data and --text (checked by load_data).
void add_data_options(CLI::App* cmd, std::string& data, TextInput& text);
// Adds `--tokenizer FILE` alone (generate).
void add_tokenizer_option(CLI::App* cmd, std::optional<std::string>& tokenizer);

// The tokenizer: `given`, else the model folder's tokenizer.json; Error naming both when
// neither is there (`why` says what needs it, e.g. "--text").
Tokenizer load_tokenizer(const std::optional<std::string>& given, const std::string& model_dir,
                         const std::string& why);

// Throws Error unless exactly one of --data and --text is given, or when --text has no tokenizer
// to find (called before the long model load).
void check_data_choice(const std::string& data, const TextInput& text,
                       const std::string& model_dir);
// The token data of --data, or of --text cut into --seq-len sequences (said on stdout when
// `verbose`).
TokenData load_data(const std::string& data, const TextInput& text, const std::string& model_dir,
                    int vocab_size, bool verbose);

}  // namespace fp8kv::cli
