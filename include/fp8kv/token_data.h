// Token-id data (docs/FORMATS.md, "Token data"): JSONL, one {"input_ids": [...]} per line.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "fp8kv/export.h"

namespace fp8kv {

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
// Total tokens.
FP8KV_API int64_t count_tokens(const TokenData& data);

}  // namespace fp8kv
