// The quant-param JSON (vLLM / SGLang --quantization-param-path) and the per_head -> per_tensor
// reduction: round trips exact in float32, every refusal of tests/data/scales/bad_qp_*.json
// named by its field and value.
#include "fp8kv/kv_formats.h"

#include <gtest/gtest.h>

#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "fp8kv/error.h"
#include "runtime/test_util.h"

namespace fp8kv {
namespace {

const std::string kDir = std::string(FP8KV_SOURCE_DIR) + "/tests/data/scales/";

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

std::string error_of_parse(const std::string& file, const CalibExpect& expect = {},
                           bool reduce_max = false) {
  try {
    parse_quant_param_json(slurp(kDir + file), file, expect, reduce_max);
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

uint32_t bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}

CalibData per_tensor(const std::vector<float>& kv) {
  CalibData d;
  d.architectures = "LlamaForCausalLM";
  d.quant_type = QuantType::kPerTensor;
  d.num_layers = static_cast<int>(kv.size() / 2);
  d.num_head = 2;
  d.scales = kv;
  return d;
}

TEST(QuantParamJson, ReadsEveryRankAndFillsWhatTheFormatLacks) {
  CalibExpect expect;
  expect.architectures = "LlamaForCausalLM";
  expect.num_kv_heads = 8;
  expect.num_layers = 2;
  std::string model_type;
  const CalibData d = parse_quant_param_json(slurp(kDir + "ok_quant_param_tp2.json"), "ok", expect,
                                             false, &model_type);
  EXPECT_EQ(model_type, "llama");
  EXPECT_EQ(d.quant_type, QuantType::kPerTensor);
  EXPECT_EQ(d.num_layers, 2);
  EXPECT_EQ(d.num_head, 8);
  EXPECT_EQ(d.architectures, "LlamaForCausalLM");
  EXPECT_EQ(d.scales, (std::vector<float>{0.0125f, 0.0125f, 0.5f, 0.5f}));
}

// Writing takes max(k, v) per layer, lists every rank, and reads back bit for bit, for values
// whose shortest decimal text is long (1/3, the smallest normal float, 448 / 7).
TEST(QuantParamJson, WriteListsEveryRankAndRoundTripsExactly) {
  const float a = 1.0f / 3.0f, b = 1.17549435e-38f, c = 448.0f / 7.0f;
  const CalibData d = per_tensor({a, b, c / 2, c, 0.25f, 0.125f});
  const std::string text = quant_param_json_text(d, "qwen2", 4);
  const nlohmann::json j = nlohmann::json::parse(text);
  EXPECT_EQ(j["model_type"], "qwen2");
  EXPECT_EQ(j["kv_cache"]["dtype"], "float8_e4m3fn");
  ASSERT_EQ(j["kv_cache"]["scaling_factor"].size(), 4u);
  for (const char* rank : {"0", "1", "2", "3"}) {
    ASSERT_EQ(j["kv_cache"]["scaling_factor"][rank].size(), 3u) << rank;
  }
  const CalibData back = parse_quant_param_json(text, "written", {}, false);
  ASSERT_EQ(back.scales.size(), 6u);
  const std::vector<float> want = {a, a, c, c, 0.25f, 0.25f};  // max(k, v) for K and V
  for (size_t i = 0; i < want.size(); ++i) EXPECT_EQ(bits(back.scales[i]), bits(want[i])) << i;
  EXPECT_EQ(back.num_head, 0);  // not in the format, not asked for
  EXPECT_TRUE(back.architectures.empty());
  EXPECT_EQ(nlohmann::json::parse(quant_param_json_text(d, "", 1))["model_type"], nullptr);
}

TEST(QuantParamJson, WriteRefusesWhatItCannotHold) {
  CalibData d = per_tensor({0.5f, 0.5f});
  d.quant_type = QuantType::kPerHead;
  d.num_head = 1;
  EXPECT_NE(std::string(error_of([&] {
              quant_param_json_text(d, "llama", 1);
            })).find("needs --reduce max"),
            std::string::npos);
  d = per_tensor({0.5f, 0.5f, 0.25f, 0.25f});
  d.num_target_layers = 1;
  d.num_draft_layers = 1;
  EXPECT_NE(error_of([&] {
              quant_param_json_text(d, "llama", 1);
            }).find("no place for the 1 draft-model layers"),
            std::string::npos);
}

TEST(QuantParamJson, RanksThatDisagreeNeedReduceMax) {
  EXPECT_NE(error_of_parse("bad_qp_ranks_disagree.json")
                .find("field 'kv_cache.scaling_factor.1.0': 0.025 differs from rank 0's 0.0125"),
            std::string::npos)
      << error_of_parse("bad_qp_ranks_disagree.json");
  const CalibData d = parse_quant_param_json(slurp(kDir + "bad_qp_ranks_disagree.json"), "x", {},
                                             /*reduce_max=*/true);
  EXPECT_EQ(d.scales, (std::vector<float>{0.025f, 0.025f, 0.5f, 0.5f}));
}

TEST(QuantParamJson, ChecksTheModel) {
  CalibExpect layers;
  layers.num_layers = 3;
  EXPECT_NE(error_of_parse("ok_quant_param_tp2.json", layers)
                .find("expected 3 layers (the model's), found 2"),
            std::string::npos);
  // A per-head scheme takes the one scale per layer broadcast to the model's KV heads.
  CalibExpect head;
  head.quant_type = QuantType::kPerHead;
  head.num_kv_heads = 3;
  const CalibData d =
      parse_quant_param_json(slurp(kDir + "ok_quant_param_tp2.json"), "qp", head, false);
  EXPECT_EQ(d.quant_type, QuantType::kPerTensor);
  EXPECT_EQ(d.num_head, 3);
  const RankScales r = scales_for_scheme(d, KvScheme::kFp8PerHead, 1, 0);
  EXPECT_EQ(r.kv, (std::vector<float>{0.0125f, 0.0125f, 0.0125f, 0.0125f, 0.0125f, 0.0125f, 0.5f,
                                      0.5f, 0.5f, 0.5f, 0.5f, 0.5f}));  // [2 layers, K 3 | V 3]
}

// Each fixture and a part of the message it must produce (field and value named).
TEST(QuantParamJson, RefusesEachBadFixture) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"bad_qp_dtype.json", "field 'kv_cache.dtype': expected \"float8_e4m3fn\""},
      {"bad_qp_missing_rank.json", "rank \"1\" is missing"},
      {"bad_qp_rank_key.json", "key \"rank1\": expected a rank index"},
      {"bad_qp_layer_gap.json", "field 'kv_cache.scaling_factor.1': layer \"1\" is missing"},
      {"bad_qp_layer_count.json",
       "field 'kv_cache.scaling_factor.1': 1 layers, but rank 0 lists 2"},
      {"bad_qp_scale_zero.json",
       "field 'kv_cache.scaling_factor.1.1': expected a finite scale > 0 (as float32), found 0.0"},
      {"bad_qp_scale_string.json", "found a string \"0.5\""},
      {"bad_qp_kv_cache_missing.json", "missing field 'kv_cache'"},
      {"bad_qp_no_ranks.json", "field 'kv_cache.scaling_factor': expected an object"},
      {"bad_qp_duplicate_key.json", "key \"0\" appears twice in one object"},
      {"bad_qp_nan.json", "non-finite number 'NaN'"},
      {"bad_qp_deep_nesting.json", "JSON nested deeper than 64 levels"},
  };
  for (const auto& [file, part] : cases) {
    const std::string message = error_of_parse(file);
    EXPECT_NE(message.find(part), std::string::npos) << file << ": " << message;
    EXPECT_EQ(message.rfind(file, 0), 0u) << file << ": the message names the file: " << message;
  }
}

TEST(ReduceToPerTensor, TakesEachLayersMaxOverHeadsKAndVApart) {
  CalibData d;
  d.quant_type = QuantType::kPerHead;
  d.num_layers = 2;
  d.num_head = 3;
  // Row l: K of heads 0..2, then V of heads 0..2.
  d.scales = {0.1f, 0.3f, 0.2f, 0.05f, 0.01f, 0.02f,  //
              1.0f, 2.0f, 3.0f, 6.0f,  5.0f,  4.0f};
  const CalibData r = reduce_to_per_tensor(d);
  EXPECT_EQ(r.quant_type, QuantType::kPerTensor);
  EXPECT_EQ(r.num_head, 3);
  EXPECT_EQ(r.scales, (std::vector<float>{0.3f, 0.05f, 3.0f, 6.0f}));
}

}  // namespace
}  // namespace fp8kv
