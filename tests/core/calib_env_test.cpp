// The calibration warmup / count from the environment: ours (FP8KV_CALIB_*) and LightLLM's
// names for them (calib_warmup_from_env, calib_count_from_env).
#include <gtest/gtest.h>
#include <stdlib.h>

#include <string>

#include "fp8kv/error.h"
#include "fp8kv/observer.h"

namespace fp8kv {
namespace {

const char* const kWarmupNames[] = {"FP8KV_CALIB_WARMUP", "KV_QUANT_CALIBRATION_WARMUP_COUNT",
                                    "LIGHTLLM_KV_QUANT_CALIBRATION_WARMUP_COUNT",
                                    "LIGHTLLM_KV_QUANT_CALIBRARTION_WARMUP_COUNT"};
const char* const kCountNames[] = {"FP8KV_CALIB_COUNT", "KV_QUANT_CALIBRATION_INFERENCE_COUNT",
                                   "LIGHTLLM_KV_QUANT_CALIBRATION_INFERENCE_COUNT",
                                   "LIGHTLLM_KV_QUANT_CALIBRARTION_INFERENCE_COUNT"};

// Every test starts and ends with none of the variables set.
class CalibEnvTest : public ::testing::Test {
 protected:
  void SetUp() override { clear(); }
  void TearDown() override { clear(); }
  static void clear() {
    for (const char* n : kWarmupNames) ::unsetenv(n);
    for (const char* n : kCountNames) ::unsetenv(n);
  }
};

TEST_F(CalibEnvTest, NothingSet) {
  EXPECT_FALSE(calib_warmup_from_env().has_value());
  EXPECT_FALSE(calib_count_from_env().has_value());
  ObserverConfig base;
  base.warmup = 2;
  base.count = 9;
  const ObserverConfig c = observer_config_from_env(base);
  EXPECT_EQ(c.warmup, 2);
  EXPECT_EQ(c.count, 9);
}

// Each of LightLLM's names alone sets the value and is named as the source.
TEST_F(CalibEnvTest, EachLightLlmNameAlone) {
  for (int i = 1; i < 4; ++i) {
    ::setenv(kWarmupNames[i], "3", 1);
    ::setenv(kCountNames[i], std::to_string(10 + i).c_str(), 1);
    const auto w = calib_warmup_from_env();
    const auto c = calib_count_from_env();
    ASSERT_TRUE(w && c) << kCountNames[i];
    EXPECT_EQ(w->value, 3);
    EXPECT_EQ(w->variable, kWarmupNames[i]);
    EXPECT_EQ(c->value, 10 + i);
    EXPECT_EQ(c->variable, kCountNames[i]);
    EXPECT_EQ(c->ignored, "");
    const ObserverConfig oc = observer_config_from_env(ObserverConfig{});
    EXPECT_EQ(oc.warmup, 3);
    EXPECT_EQ(oc.count, 10 + i);
    clear();
  }
}

TEST_F(CalibEnvTest, OursWinAndTheLoserIsNamed) {
  ::setenv("FP8KV_CALIB_COUNT", "7", 1);
  ::setenv("LIGHTLLM_KV_QUANT_CALIBRARTION_INFERENCE_COUNT", "4000", 1);
  const auto c = calib_count_from_env();
  ASSERT_TRUE(c);
  EXPECT_EQ(c->value, 7);
  EXPECT_EQ(c->variable, "FP8KV_CALIB_COUNT");
  EXPECT_EQ(c->ignored, "LIGHTLLM_KV_QUANT_CALIBRARTION_INFERENCE_COUNT=4000");
  // Ours win even over LightLLM names that disagree with each other.
  ::setenv("KV_QUANT_CALIBRATION_INFERENCE_COUNT", "5", 1);
  EXPECT_EQ(calib_count_from_env()->value, 7);
}

TEST_F(CalibEnvTest, LightLlmNamesMustAgree) {
  ::setenv("KV_QUANT_CALIBRATION_WARMUP_COUNT", "2", 1);
  ::setenv("LIGHTLLM_KV_QUANT_CALIBRARTION_WARMUP_COUNT", "2", 1);
  EXPECT_EQ(calib_warmup_from_env()->variable, "KV_QUANT_CALIBRATION_WARMUP_COUNT");
  ::setenv("LIGHTLLM_KV_QUANT_CALIBRARTION_WARMUP_COUNT", "5", 1);
  try {
    calib_warmup_from_env();
    FAIL() << "disagreeing names accepted";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("KV_QUANT_CALIBRATION_WARMUP_COUNT=2"), std::string::npos) << msg;
    EXPECT_NE(msg.find("LIGHTLLM_KV_QUANT_CALIBRARTION_WARMUP_COUNT=5"), std::string::npos) << msg;
    EXPECT_NE(msg.find("FP8KV_CALIB_WARMUP"), std::string::npos) << msg;
  }
}

TEST_F(CalibEnvTest, BadTextNamesTheVariable) {
  ::setenv("LIGHTLLM_KV_QUANT_CALIBRARTION_INFERENCE_COUNT", "4k", 1);
  try {
    calib_count_from_env();
    FAIL() << "4k accepted";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("LIGHTLLM_KV_QUANT_CALIBRARTION_INFERENCE_COUNT='4k'"), std::string::npos)
        << msg;
  }
}

}  // namespace
}  // namespace fp8kv
