#include "fp8kv/model_config.h"

#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>

#include "fp8kv/error.h"
#include "runtime/test_util.h"

namespace fp8kv {
namespace {

const std::string kData = std::string(FP8KV_SOURCE_DIR) + "/tests/data/model/";

ModelConfig config_from_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return parse_model_config(ss.str(), path);
}

// A small valid Llama config with `extra` fields spliced in (they override earlier ones).
std::string llama(const std::string& extra = "") {
  return R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 512,
             "intermediate_size": 1024, "num_hidden_layers": 2, "num_attention_heads": 8,
             "num_key_value_heads": 2, "vocab_size": 100)" +
         (extra.empty() ? "" : ", " + extra) + "}";
}

TEST(ModelConfig, Llama31WithLlama3RopeScaling) {
  const ModelConfig c = config_from_file(kData + "llama-3.1-8b-config.json");
  EXPECT_EQ(c.architecture, "LlamaForCausalLM");
  EXPECT_EQ(c.hidden_size, 4096);
  EXPECT_EQ(c.num_layers, 32);
  EXPECT_EQ(c.num_q_heads, 32);
  EXPECT_EQ(c.num_kv_heads, 8);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.vocab_size, 128256);
  EXPECT_FLOAT_EQ(c.rms_norm_eps, 1e-5f);
  EXPECT_FALSE(c.attention_bias);
  EXPECT_FALSE(c.tie_word_embeddings);
  ASSERT_EQ(c.rope_scaling.type, RopeScaling::Type::kLlama3);
  EXPECT_EQ(c.rope_scaling.factor, 8.0f);
  EXPECT_EQ(c.rope_scaling.original_max_position_embeddings, 8192);

  // Inverse frequencies against the Llama 3.1 rule, computed here independently: wavelengths
  // below 8192/4 are kept, above 8192/1 divided by 8, and the band between interpolated.
  const std::vector<float> inv = rope_inv_freq(c);
  ASSERT_EQ(inv.size(), 64u);
  int kept = 0, divided = 0, smoothed = 0;
  for (int i = 0; i < 64; ++i) {
    const double base = std::pow(500000.0, -2.0 * i / 128);
    const double wavelen = 2 * M_PI / base;
    double want;
    if (wavelen < 2048) {
      want = base;
      ++kept;
    } else if (wavelen > 8192) {
      want = base / 8;
      ++divided;
    } else {
      const double smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0);
      want = (1 - smooth) * base / 8 + smooth * base;
      ++smoothed;
    }
    EXPECT_NEAR(inv[i], want, 1e-6 * want) << i;
  }
  EXPECT_GT(kept, 0);
  EXPECT_GT(divided, 0);
  EXPECT_GT(smoothed, 0);
  EXPECT_EQ(inv[0], 1.0f);
}

TEST(ModelConfig, Qwen2HasBiasByDefaultAndTiedEmbeddings) {
  const ModelConfig c = config_from_file(kData + "qwen2.5-0.5b-config.json");
  EXPECT_EQ(c.architecture, "Qwen2ForCausalLM");
  EXPECT_TRUE(c.attention_bias);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_EQ(c.head_dim, 64);  // 896 / 14
  EXPECT_EQ(c.num_kv_heads, 2);
  EXPECT_EQ(c.rope_scaling.type, RopeScaling::Type::kNone);
  const std::vector<float> inv = rope_inv_freq(c);
  EXPECT_NEAR(inv[1], std::pow(1e6, -2.0 / 64), 1e-7);
}

TEST(ModelConfig, ExplicitHeadDimAndDefaults) {
  ModelConfig c = parse_model_config(llama(R"("head_dim": 128)"), "cfg");
  EXPECT_EQ(c.head_dim, 128);  // not 512 / 8
  c = parse_model_config(llama(), "cfg");
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_FLOAT_EQ(c.rope_theta, 10000.0f);
  EXPECT_FALSE(c.attention_bias);
  c = parse_model_config(llama(R"("attention_bias": true, "rope_scaling": null)"), "cfg");
  EXPECT_TRUE(c.attention_bias);
  c = parse_model_config(llama(R"("rope_scaling": {"rope_type": "default"})"), "cfg");
  EXPECT_EQ(c.rope_scaling.type, RopeScaling::Type::kNone);
}

TEST(ModelConfig, RoundTripThroughJson) {
  ModelConfig c = parse_model_config(llama(R"("head_dim": 128, "tie_word_embeddings": true,
      "rope_scaling": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
      "high_freq_factor": 2.0, "original_max_position_embeddings": 4096})"),
                                     "cfg");
  const ModelConfig d = parse_model_config(model_config_to_json(c), "json");
  EXPECT_EQ(d.head_dim, 128);
  EXPECT_TRUE(d.tie_word_embeddings);
  EXPECT_EQ(d.rope_scaling.type, RopeScaling::Type::kLlama3);
  EXPECT_EQ(d.rope_scaling.factor, 4.0f);
  EXPECT_EQ(d.rope_scaling.original_max_position_embeddings, 4096);
  EXPECT_EQ(rope_inv_freq(c), rope_inv_freq(d));
}

TEST(ModelConfig, BadConfigsNameFileAndField) {
  std::string e = error_of([] {
    parse_model_config(R"({"architectures": ["LlamaForCausalLM"], "intermediate_size": 1,
        "num_hidden_layers": 1, "num_attention_heads": 1, "vocab_size": 1})",
                       "dir/config.json");
  });
  EXPECT_NE(e.find("dir/config.json"), std::string::npos) << e;
  EXPECT_NE(e.find("'hidden_size'"), std::string::npos) << e;

  e = error_of([] { parse_model_config(llama(R"("num_key_value_heads": 3)"), "cfg"); });
  EXPECT_NE(e.find("not a multiple of num_key_value_heads 3"), std::string::npos) << e;
  e = error_of([] { parse_model_config(llama(R"("hidden_size": "512")"), "cfg"); });
  EXPECT_NE(e.find("'hidden_size' must be an integer"), std::string::npos) << e;
  e = error_of([] { parse_model_config(llama(R"("num_attention_heads": 7)"), "cfg"); });
  EXPECT_NE(e.find("not divisible"), std::string::npos) << e;
  e = error_of([] {
    parse_model_config(llama(R"("rope_scaling": {"rope_type": "yarn", "factor": 4.0})"), "cfg");
  });
  EXPECT_NE(e.find("'yarn'"), std::string::npos) << e;
  e = error_of([] {
    parse_model_config(llama(R"("rope_scaling": {"rope_type": "llama3", "factor": 8.0,
        "low_freq_factor": 1.0, "original_max_position_embeddings": 8192})"),
                       "cfg");
  });
  EXPECT_NE(e.find("high_freq_factor"), std::string::npos) << e;
  e = error_of([] { parse_model_config(R"({"architectures": ["GPT2LMHeadModel"]})", "cfg"); });
  EXPECT_NE(e.find("'GPT2LMHeadModel' is not supported"), std::string::npos) << e;
  e = error_of([] { parse_model_config("{", "cfg"); });
  EXPECT_NE(e.find("not valid JSON"), std::string::npos) << e;
  e = error_of([] { load_model_config("/nonexistent/model"); });
  EXPECT_NE(e.find("/nonexistent/model/config.json"), std::string::npos) << e;
}

}  // namespace
}  // namespace fp8kv

namespace fp8kv {
namespace {

// transformers v5 saves RoPE settings as one rope_parameters object (theta and scaling).
TEST(ModelConfig, TransformersV5RopeParameters) {
  const ModelConfig plain = parse_model_config(
      llama(R"("rope_parameters": {"rope_type": "default", "rope_theta": 500000.0})"), "v5.json");
  EXPECT_FLOAT_EQ(plain.rope_theta, 500000.0f);
  EXPECT_EQ(plain.rope_scaling.type, RopeScaling::Type::kNone);
  const ModelConfig l3 = parse_model_config(
      llama(R"("rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192})"),
      "v5.json");
  EXPECT_FLOAT_EQ(l3.rope_theta, 500000.0f);
  EXPECT_EQ(l3.rope_scaling.type, RopeScaling::Type::kLlama3);
  EXPECT_EQ(l3.rope_scaling.factor, 8.0f);
  const std::string bad = error_of([] {
    parse_model_config(llama(R"("rope_parameters": {"rope_type": "yarn", "factor": 4.0})"),
                       "v5.json");
  });
  EXPECT_NE(bad.find("yarn"), std::string::npos) << bad;
}

}  // namespace
}  // namespace fp8kv
