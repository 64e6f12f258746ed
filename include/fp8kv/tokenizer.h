// Byte-level BPE tokenizer read from a Hugging Face tokenizer.json (the kind Llama 3, Qwen2/2.5/3
// and GPT-2 ship; docs/FORMATS.md, "tokenizer.json"). Host only.
//
// encode(text): invalid UTF-8 in `text` is first replaced with U+FFFD (sanitize_utf8), which is
// what the `tokenizers` library sees when Python decodes the same bytes with errors="replace";
// then added/special tokens are split out (leftmost-longest), the rest is normalized (none or
// NFC), pre-tokenized (Split regex / ByteLevel), mapped byte-to-unicode and merged by rank.
// No post-processor runs: no BOS/EOS is added (`tokenizers`' add_special_tokens=False).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "fp8kv/export.h"

namespace fp8kv {

class FP8KV_API Tokenizer {
 public:
  // Parses tokenizer.json text; `name` stands for the file in messages. Throws Error naming what
  // is wrong (truncated JSON, missing "model", a model other than BPE, an unknown pre-tokenizer
  // or normalizer, a merge whose parts or result are not in the vocabulary, ...).
  static Tokenizer parse(const std::string& json_text, const std::string& name);
  // Reads `path`: a tokenizer.json, or a folder that holds one.
  static Tokenizer load(const std::string& path);

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // UTF-8 text (any bytes) -> token ids.
  std::vector<int32_t> encode(const std::string& text) const;
  // Token ids -> text. Bytes that do not form UTF-8 (ids cut inside a character) become U+FFFD,
  // as the ByteLevel decoder of `tokenizers` does. Throws Error on an id with no token.
  std::string decode(const std::vector<int32_t>& ids) const;
  // One more than the largest id of the vocabulary and added tokens.
  int vocab_size() const;
  // The token of `id` (its byte-level form), for messages.
  std::string token(int32_t id) const;

 private:
  struct Impl;
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// `bytes` with every ill-formed UTF-8 sequence replaced by U+FFFD, one per maximal subpart
// (Unicode 15 §3.9, the policy of Python's errors="replace" and Rust's from_utf8_lossy).
FP8KV_API std::string sanitize_utf8(const std::string& bytes);

}  // namespace fp8kv
