// Token-id data (docs/FORMATS.md, "Token data"): JSONL, one {"input_ids": [...]} per line; or
// text (plain, or JSONL with a "text" string per line) cut into sequences by a tokenizer.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "fp8kv/export.h"

namespace fp8kv {

class Tokenizer;

// Sequences of token ids, [num_sequences][len].
using TokenData = std::vector<std::vector<int32_t>>;

// Parses JSONL text; `name` stands for the file in messages. Blank lines are skipped; a line that
// is not a JSON object with a non-empty "input_ids" array of integers in [0, vocab_size) throws
// Error naming the file and the line number (1-based). vocab_size <= 0 skips the upper bound.
FP8KV_API TokenData parse_token_data(const std::string& text, const std::string& name,
                                     int vocab_size);
FP8KV_API TokenData load_token_data(const std::string& path, int vocab_size);
// Writes one {"input_ids": [...]} line per sequence.
FP8KV_API void write_token_data(const std::string& path, const TokenData& data);
// Text data: `path` is JSONL with a "text" string per line when it ends in ".jsonl", plain text
// otherwise. Each document (the whole plain file, or each line's text) is encoded with `tok`;
// the ids are concatenated in order and cut into sequences of `seq_len` tokens, the rest (if it
// has at least 2 tokens) as a last, shorter sequence. Throws Error naming the file (and line)
// for a missing/bad "text", no tokens, or an id >= vocab_size (a tokenizer that does not fit
// the model; vocab_size <= 0 skips the check).
FP8KV_API TokenData load_text_data(const std::string& path, const Tokenizer& tok, int seq_len,
                                   int vocab_size);
// `ids` cut into sequences of seq_len, the rest (>= 2 tokens) last.
FP8KV_API TokenData chunk_ids(const std::vector<int32_t>& ids, int seq_len);
// Total tokens.
FP8KV_API int64_t count_tokens(const TokenData& data);

}  // namespace fp8kv
