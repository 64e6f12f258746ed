#include "fp8kv/tokenizer.h"

#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "fp8kv/error.h"

namespace fp8kv {
namespace {

using json = nlohmann::json;
using Ids = std::vector<int32_t>;

const std::string kDir = std::string(FP8KV_SOURCE_DIR) + "/tests/data/tokenizer/";
const std::string kFixture = kDir + "llama3_tiny.json";
const std::string kReplacement = "\xEF\xBF\xBD";

std::string read(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

json fixture_json() { return json::parse(read(kFixture)); }

Tokenizer from(const json& j) { return Tokenizer::parse(j.dump(), "test.json"); }

// The message of the Error that parsing `text` throws ("" when it does not throw).
std::string refusal(const std::string& text) {
  try {
    Tokenizer::parse(text, "bad.json");
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

std::string refusal_of_file(const std::string& path) {
  try {
    Tokenizer::load(path);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// texts.jsonl gives invalid UTF-8 as "bytes": a string of code points < 256, one per byte.
std::string text_of(const json& t) {
  if (t.contains("text")) return t["text"].get<std::string>();
  std::string bytes;
  const std::string utf8 = t["bytes"].get<std::string>();
  for (size_t i = 0; i < utf8.size(); ++i) {
    const auto c = static_cast<unsigned char>(utf8[i]);
    if (c < 0x80) {
      bytes += static_cast<char>(c);
    } else {  // U+0080..U+00FF as two bytes C2/C3 xx
      bytes +=
          static_cast<char>(((c & 0x03) << 6) | (static_cast<unsigned char>(utf8[++i]) & 0x3F));
    }
  }
  return bytes;
}

#if !defined(FP8KV_HAVE_PCRE2)
TEST(Tokenizer, RefusesWithoutPcre2) {
  EXPECT_NE(refusal(read(kFixture)).find("PCRE2"), std::string::npos);
}
#else

TEST(Tokenizer, FixtureTextsGiveTheExpectedIds) {
  const Tokenizer tok = Tokenizer::load(kFixture);
  EXPECT_EQ(tok.vocab_size(), 289);
  std::ifstream texts(kDir + "texts.jsonl"), expected(kDir + "expected_ids.jsonl");
  std::string tl, el;
  int n = 0;
  while (std::getline(texts, tl) && std::getline(expected, el)) {
    const json t = json::parse(tl), e = json::parse(el);
    ASSERT_EQ(t["name"], e["name"]);
    EXPECT_EQ(tok.encode(text_of(t)), e["ids"].get<Ids>()) << t["name"];
    ++n;
  }
  EXPECT_EQ(n, 9);
}

TEST(Tokenizer, RoundTripsValidTextAndSanitizesInvalid) {
  const Tokenizer tok = Tokenizer::load(kFixture);
  std::ifstream texts(kDir + "texts.jsonl");
  std::string line;
  while (std::getline(texts, line)) {
    const std::string text = text_of(json::parse(line));
    EXPECT_EQ(tok.decode(tok.encode(text)), sanitize_utf8(text)) << line;
  }
  const std::string extra = "  leading, trailing  \n\n\t x\r\n 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u00a0\u3000end";
  EXPECT_EQ(tok.decode(tok.encode(extra)), extra);
}

TEST(Tokenizer, MergesByRankAndIgnoreMerges) {
  const Tokenizer tok = Tokenizer::load(kFixture);
  // "the": (h,e) is the only merge -> t + he. " the": (Ġ,t) rank 0 first, then (h,e), then
  // (Ġt,he) -> one token.
  EXPECT_EQ(tok.encode("the"), (Ids{116, 257}));
  EXPECT_EQ(tok.encode(" the"), (Ids{258}));
  // " hat" is in the vocabulary but no merge leads there: found whole by ignore_merges...
  EXPECT_EQ(tok.encode(" hat"), (Ids{285}));
  // ...and merged from bytes without it (Ġ h at).
  json j = fixture_json();
  j["model"]["ignore_merges"] = false;
  EXPECT_EQ(from(j).encode(" hat"), (Ids{32, 104, 260}));
  // Llama 3's \p{N}{1,3}: digits go in threes ("123" merges, "45" does not).
  EXPECT_EQ(tok.encode("12345"), (Ids{276, 52, 53}));
  // Whitespace runs: \s+(?!\S) leaves the last space to the word that follows.
  EXPECT_EQ(tok.encode("a   b"), (Ids{97, 264, 32, 98}));
}

TEST(Tokenizer, WhitespaceIsUnicodeWhiteSpaceAsInOniguruma) {
  // U+180E (MONGOLIAN VOWEL SEPARATOR) is in PCRE2's \s but not in Unicode's White_Space, which
  // Oniguruma's (so `tokenizers`') \s is. "a", U+180E, U+180E, "b" splits as "a" | U+180E U+180E
  // (" ?[^\s\p{L}\p{N}]+") | "b"; with PCRE2's \s it would be "a" | U+180E (\s+(?!\S)) | U+180E
  // "b". The vocabulary entry below makes the two-separator piece one token.
  const std::string mvs = "\xE1\xA0\x8E";
  json j = fixture_json();
  j["model"]["vocab"]["\xC3\xA1\xC5\x82\xC4\xB0\xC3\xA1\xC5\x82\xC4\xB0"] = 289;  // E1 A0 8E x2
  for (auto& a : j["added_tokens"]) a["id"] = a["id"].get<int>() + 1;
  const Tokenizer tok = from(j);
  EXPECT_EQ(tok.encode("a" + mvs + mvs + "b"), (Ids{97, 289, 98}));
  // "x", two spaces, U+180E: the second space goes with U+180E (" ?[^\s\p{L}\p{N}]+"), the first
  // stays alone; were U+180E \s, "  " + U+180E would be one whitespace piece (and "  " merge).
  EXPECT_EQ(tok.encode("x  " + mvs), (Ids{120, 32, 32, 225, 160, 142}));
  // Other whitespace is unchanged: NEL and NBSP are \s in both.
  EXPECT_EQ(tok.encode("a\xC2\x85\xC2\x85"
                       "b"),
            (Ids{97, 194, 133, 194, 133, 98}));
}

TEST(Tokenizer, ReadsBothMergeFormats) {
  json j = fixture_json();
  for (auto& m : j["model"]["merges"]) m = m[0].get<std::string>() + " " + m[1].get<std::string>();
  const Tokenizer strings = from(j), pairs = Tokenizer::load(kFixture);
  for (const std::string text :
       {"the cat in the hat", "def f(x):\n    return 123\n", "你好🙂"}) {
    EXPECT_EQ(strings.encode(text), pairs.encode(text)) << text;
  }
}

TEST(Tokenizer, Gpt2ByteLevelPreTokenizer) {
  // A merge across Llama 3's "[^\r\n\p{L}\p{N}]?\p{L}+" piece "(x": GPT-2's regex cuts "(" from
  // "x", so only the Llama 3 split can use it.
  json j = fixture_json();
  const std::string merged = "(x";
  j["model"]["vocab"][merged] = 289;
  j["model"]["merges"].push_back(json::array({"(", "x"}));
  for (auto& a : j["added_tokens"]) a["id"] = a["id"].get<int>() + 1;
  EXPECT_EQ(from(j).encode("f(x)"), (Ids{102, 289, 41}));
  j["pre_tokenizer"] = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}};
  EXPECT_EQ(from(j).encode("f(x)"), (Ids{102, 40, 120, 41}));
  // add_prefix_space: "the" is encoded as " the".
  j["pre_tokenizer"]["add_prefix_space"] = true;
  EXPECT_EQ(from(j).encode("the"), (Ids{258}));
  EXPECT_EQ(from(j).encode(" the"), (Ids{258}));
}

TEST(Tokenizer, AddedTokensSplitFirstLongestAndStrip) {
  const Tokenizer tok = Tokenizer::load(kFixture);
  // An added token inside a word still splits it; an incomplete one is plain text.
  EXPECT_EQ(tok.encode("ca<|eot_id|>t"), (Ids{99, 97, 287, 116}));
  EXPECT_EQ(tok.encode("<|eot_id"), (Ids{60, 124, 101, 111, 116, 95, 105, 100}));
  // Longest wins at the same start: "<|x|>" vs a longer "<|x|>y".
  json j = fixture_json();
  j["added_tokens"].push_back({{"id", 289}, {"content", "<|x|>y"}, {"special", true}});
  EXPECT_EQ(from(j).encode("<|x|>y<|x|>"), (Ids{289, 288}));
  // lstrip / rstrip take the spaces beside the token.
  j = fixture_json();
  EXPECT_EQ(from(j).encode("the <|eot_id|> the"), (Ids{116, 257, 32, 287, 258}));
  j["added_tokens"][1]["lstrip"] = true;
  EXPECT_EQ(from(j).encode("the <|eot_id|> the"), (Ids{116, 257, 287, 258}));
  j["added_tokens"][1]["rstrip"] = true;
  EXPECT_EQ(from(j).encode("the <|eot_id|> the"), (Ids{116, 257, 287, 116, 257}));
}

TEST(Tokenizer, NfcNormalizer) {
  json j = fixture_json();
  const std::string decomposed = "e\xCC\x81";  // e + U+0301 COMBINING ACUTE ACCENT
  EXPECT_EQ(from(j).encode(decomposed), (Ids{101, 204, 129}));
  j["normalizer"] = {{"type", "NFC"}};
#if defined(FP8KV_HAVE_UNISTRING)
  EXPECT_EQ(from(j).encode(decomposed), (Ids{195, 169}));  // U+00E9
  j["normalizer"] = {{"type", "Sequence"}, {"normalizers", json::array({{{"type", "NFC"}}})}};
  EXPECT_EQ(from(j).encode(decomposed), (Ids{195, 169}));
#else
  EXPECT_NE(refusal(j.dump()).find("libunistring"), std::string::npos);
#endif
}

TEST(Tokenizer, DecodesBytesAndRefusesUnknownIds) {
  const Tokenizer tok = Tokenizer::load(kFixture);
  EXPECT_EQ(tok.decode({258, 32, 261}), " the cat");
  EXPECT_EQ(tok.decode({286, 258}), "<|begin_of_text|> the");
  // The first two bytes of 你 (E4 BD) without the third: one U+FFFD, as from_utf8_lossy gives.
  EXPECT_EQ(tok.decode({277, 32}), kReplacement + " ");
  EXPECT_EQ(tok.decode({}), "");
  try {
    tok.decode({258, 289});
    FAIL() << "id 289 decoded";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("ids[1] = 289"), std::string::npos) << e.what();
  }
  EXPECT_THROW(tok.decode({-1}), Error);
}

TEST(Tokenizer, RefusesBadFiles) {
  struct Case {
    const char* file;
    const char* says;
  } files[] = {
      {"bad_truncated.json", "not valid JSON"},
      {"bad_no_model.json", "no \"model\""},
      {"bad_pre_tokenizer.json", "\"Metaspace\" is not supported"},
  };
  for (const Case& c : files) {
    const std::string msg = refusal_of_file(kDir + c.file);
    EXPECT_NE(msg.find(c.says), std::string::npos) << c.file << ": " << msg;
    EXPECT_NE(msg.find(c.file), std::string::npos) << msg;
  }
  EXPECT_NE(refusal_of_file(kDir + "missing.json").find("cannot open"), std::string::npos);

  auto expect_refused = [](json j, const std::string& says) {
    const std::string msg = refusal(j.dump());
    EXPECT_NE(msg.find(says), std::string::npos) << "wanted '" << says << "', got: " << msg;
  };
  json j = fixture_json();
  j["model"]["type"] = "WordPiece";
  expect_refused(j, "model type \"WordPiece\"");
  j = fixture_json();
  j["model"].erase("merges");
  expect_refused(j, "no \"merges\"");
  j = fixture_json();
  j["model"]["merges"].push_back(json::array({"Ġ", "zz"}));
  expect_refused(j, "\"zz\" is not in the vocabulary");
  j = fixture_json();
  j["model"]["merges"].push_back("a b c");
  expect_refused(j, "model.merges[29]");
  j = fixture_json();
  j["model"]["vocab"].erase("Ā");  // byte 0x00
  expect_refused(j, "byte 0x00");
  j = fixture_json();
  j["model"]["byte_fallback"] = true;
  expect_refused(j, "byte_fallback");
  j = fixture_json();
  j["normalizer"] = {{"type", "NFKC"}};
  expect_refused(j, "normalizer type \"NFKC\"");
  j = fixture_json();
  j["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "Removed";
  expect_refused(j, "behavior \"Removed\"");
  j = fixture_json();
  j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(unclosed";
  expect_refused(j, "does not compile");
  j = fixture_json();
  j["pre_tokenizer"]["pretokenizers"].erase(1);
  expect_refused(j, "must end with one ByteLevel step");
  j = fixture_json();
  j.erase("pre_tokenizer");
  expect_refused(j, "no \"pre_tokenizer\"");
  j = fixture_json();
  j["decoder"] = {{"type", "WordPiece"}};
  expect_refused(j, "decoder type \"WordPiece\"");
  j = fixture_json();
  j["added_tokens"][0]["id"] = "x";
  expect_refused(j, "added_tokens[0].id");
  j = fixture_json();
  j["added_tokens"][0]["single_word"] = true;
  expect_refused(j, "single_word");
  j = fixture_json();
  j["model"]["vocab"] = json::array();
  expect_refused(j, "no \"vocab\" object");
}

#endif  // FP8KV_HAVE_PCRE2

TEST(Tokenizer, SanitizeUtf8ReplacesMaximalSubparts) {
  const std::string R = kReplacement;
  EXPECT_EQ(sanitize_utf8("plain ascii"), "plain ascii");
  EXPECT_EQ(sanitize_utf8("\xC3\xA9\xE4\xBD\xA0\xF0\x9F\x99\x82"),
            "\xC3\xA9\xE4\xBD\xA0\xF0\x9F\x99\x82");
  EXPECT_EQ(sanitize_utf8("a\xFF"
                          "b"),
            "a" + R + "b");
  EXPECT_EQ(sanitize_utf8("\xE4\xBDx"), R + "x");               // truncated 3-byte: one U+FFFD
  EXPECT_EQ(sanitize_utf8("\xF0\x9F\x99"), R);                  // truncated at the end
  EXPECT_EQ(sanitize_utf8("\xED\xA0\x80"), R + R + R);          // a surrogate: each byte
  EXPECT_EQ(sanitize_utf8("\xC0\xAF"), R + R);                  // overlong
  EXPECT_EQ(sanitize_utf8("\xE0\x80\x80"), R + R + R);          // overlong 3-byte
  EXPECT_EQ(sanitize_utf8("\xF4\x90\x80\x80"), R + R + R + R);  // above U+10FFFF
  EXPECT_EQ(sanitize_utf8("\x80\xBF"), R + R);                  // lone continuation bytes
  EXPECT_EQ(sanitize_utf8(std::string("a\0b", 3)), std::string("a\0b", 3));
}

}  // namespace
}  // namespace fp8kv
