#include "fp8kv/token_data.h"

#include <gtest/gtest.h>

#include <fstream>
#include <functional>
#include <string>

#include "fp8kv/error.h"
#include "fp8kv/tokenizer.h"
#include "runtime/test_util.h"

namespace fp8kv {
namespace {

TEST(TokenData, ParsesAndSkipsBlankLines) {
  const TokenData d = parse_token_data(
      "{\"input_ids\": [1, 2, 3]}\n\n   \n{\"input_ids\": [0], \"text\": \"x\"}\r\n", "d.jsonl",
      10);
  ASSERT_EQ(d.size(), 2u);
  EXPECT_EQ(d[0], (std::vector<int32_t>{1, 2, 3}));
  EXPECT_EQ(d[1], (std::vector<int32_t>{0}));
  EXPECT_EQ(count_tokens(d), 4);
}

TEST(TokenData, BadLinesNameTheLineNumber) {
  std::string e = error_of(
      [] { parse_token_data("{\"input_ids\": [1]}\n\n{\"input_ids\": [1,}\n", "d.jsonl", 10); });
  EXPECT_NE(e.find("d.jsonl:3"), std::string::npos) << e;
  e = error_of([] { parse_token_data("{\"input_ids\": [1]}\n{\"ids\": [1]}\n", "d.jsonl", 10); });
  EXPECT_NE(e.find("d.jsonl:2"), std::string::npos) << e;
  EXPECT_NE(e.find("input_ids"), std::string::npos) << e;
  e = error_of([] { parse_token_data("[1, 2]\n", "d.jsonl", 10); });
  EXPECT_NE(e.find("d.jsonl:1"), std::string::npos) << e;
  e = error_of([] { parse_token_data("{\"input_ids\": []}\n", "d.jsonl", 10); });
  EXPECT_NE(e.find("empty"), std::string::npos) << e;
  e = error_of([] { parse_token_data("{\"input_ids\": [1, -1]}\n", "d.jsonl", 10); });
  EXPECT_NE(e.find("input_ids[1] = -1"), std::string::npos) << e;
  e = error_of([] { parse_token_data("{\"input_ids\": [1.5]}\n", "d.jsonl", 10); });
  EXPECT_NE(e.find("input_ids[0] = 1.5"), std::string::npos) << e;
}

TEST(TokenData, IdAtOrAboveVocabRefused) {
  const std::string e = error_of(
      [] { parse_token_data("{\"input_ids\": [0]}\n{\"input_ids\": [3, 10]}\n", "d.jsonl", 10); });
  EXPECT_NE(e.find("d.jsonl:2"), std::string::npos) << e;
  EXPECT_NE(e.find("input_ids[1] = 10"), std::string::npos) << e;
  EXPECT_NE(e.find("[0, 10)"), std::string::npos) << e;
  EXPECT_NO_THROW(parse_token_data("{\"input_ids\": [9]}\n", "d.jsonl", 10));
}

TEST(TokenData, FileRoundTripAndMissingFile) {
  TempDir dir;
  const TokenData d = {{5, 6, 7}, {8}};
  write_token_data(dir.path() + "/d.jsonl", d);
  EXPECT_EQ(load_token_data(dir.path() + "/d.jsonl", 9), d);
  EXPECT_NE(error_of([&] { load_token_data(dir.path() + "/nope.jsonl", 9); }).find("nope.jsonl"),
            std::string::npos);
  write_token_data(dir.path() + "/empty.jsonl", {});
  EXPECT_NE(error_of([&] { load_token_data(dir.path() + "/empty.jsonl", 9); }).find("no sequences"),
            std::string::npos);
}

TEST(TokenData, ChunkIdsKeepsARestOfTwoOrMore) {
  const std::vector<int32_t> ids = {1, 2, 3, 4, 5, 6, 7};
  EXPECT_EQ(chunk_ids(ids, 3), (TokenData{{1, 2, 3}, {4, 5, 6}}));  // a rest of 1 is dropped
  EXPECT_EQ(chunk_ids(ids, 5), (TokenData{{1, 2, 3, 4, 5}, {6, 7}}));
  EXPECT_EQ(chunk_ids(ids, 7), (TokenData{ids}));
  EXPECT_EQ(chunk_ids(ids, 100), (TokenData{ids}));
  EXPECT_THROW(chunk_ids(ids, 1), Error);
}

#if defined(FP8KV_HAVE_PCRE2)
TEST(TokenData, TextFilesArePlainOrJsonlAndCutBySeqLen) {
  const Tokenizer tok =
      Tokenizer::load(std::string(FP8KV_SOURCE_DIR) + "/tests/data/tokenizer/llama3_tiny.json");
  TempDir dir;
  const std::string a = "the cat in the hat\n", b = "def f(x):\n    return 123\n";
  std::vector<int32_t> all = tok.encode(a);
  const std::vector<int32_t> ib = tok.encode(b);
  all.insert(all.end(), ib.begin(), ib.end());
  ASSERT_GT(all.size(), 12u);
  const std::string jsonl = dir.path() + "/t.jsonl", txt = dir.path() + "/t.txt";
  std::ofstream(jsonl) << "{\"text\": \"the cat in the hat\\n\"}\n\n"
                       << "{\"text\": \"def f(x):\\n    return 123\\n\", \"id\": 2}\n";
  EXPECT_EQ(load_text_data(jsonl, tok, 5, 0), chunk_ids(all, 5));
  // The same characters as a plain file are one document: the .jsonl framing is not text.
  std::ofstream(txt) << a << b;
  const TokenData plain = load_text_data(txt, tok, 1000, 0);
  ASSERT_EQ(plain.size(), 1u);
  EXPECT_EQ(plain[0], tok.encode(a + b));

  std::string e = error_of([&] { load_text_data(txt, tok, 4, 200); });  // ids up to 288
  EXPECT_NE(e.find("outside the model's vocabulary of 200"), std::string::npos) << e;
  std::ofstream(jsonl) << "{\"text\": \"ok\"}\n{\"input_ids\": [1, 2]}\n";
  e = error_of([&] { load_text_data(jsonl, tok, 4, 0); });
  EXPECT_NE(e.find("t.jsonl:2"), std::string::npos) << e;
  EXPECT_NE(e.find("\"text\""), std::string::npos) << e;
  std::ofstream(txt) << "a";
  e = error_of([&] { load_text_data(txt, tok, 4, 0); });
  EXPECT_NE(e.find("too few"), std::string::npos) << e;
  e = error_of([&] { load_text_data(dir.path() + "/none.txt", tok, 4, 0); });
  EXPECT_NE(e.find("cannot open"), std::string::npos) << e;
}
#endif

}  // namespace
}  // namespace fp8kv
