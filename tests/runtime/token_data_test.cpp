#include "fp8kv/token_data.h"

#include <gtest/gtest.h>

#include <functional>
#include <string>

#include "fp8kv/error.h"
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

}  // namespace
}  // namespace fp8kv
