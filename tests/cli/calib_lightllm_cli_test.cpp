// calibrate --lightllm-rank-layout / --generate, convert between the layouts, inspect of
// LightLLM's per-rank files and LightLLM's environment names, run as the built binary.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "cli/run_fp8kv.h"
#include "fp8kv/calib.h"
#include "runtime/test_util.h"

namespace fp8kv {
namespace {

using testing::contains;
using testing::read_file;
using testing::RunResult;
RunResult run(const std::string& args) { return testing::run_fp8kv(args); }

const std::string kDataDir = std::string(FP8KV_SOURCE_DIR) + "/tests/data/calib/";

// One tiny model (8 Q heads, 2 KV heads) and its token data for the whole suite.
class CalibLightLlmCli : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    model_ = new std::string(dir_->path() + "/tiny");
    data_ = new std::string(dir_->path() + "/data.jsonl");
    const RunResult r = run("make-model " + *model_ + " --preset tiny");
    ASSERT_EQ(r.exit_code, 0) << r.output;
    testing::write_tiny_token_data(*data_);
  }
  static void TearDownTestSuite() {
    delete data_;
    delete model_;
    delete dir_;
  }
  static std::string calibrate(const std::string& args) {
    return "calibrate --model " + *model_ + " --data " + *data_ + " --batch 2 " + args;
  }
  static TempDir* dir_;
  static std::string* model_;
  static std::string* data_;
};

TempDir* CalibLightLlmCli::dir_ = nullptr;
std::string* CalibLightLlmCli::model_ = nullptr;
std::string* CalibLightLlmCli::data_ = nullptr;

// tp 8 over 2 KV heads: the per-rank file has num_head 8, loads back, and convert turns each
// layout into the other byte for byte.
TEST_F(CalibLightLlmCli, RankLayoutAndConvert) {
  const std::string merged = dir_->path() + "/merged.json";
  const std::string per_rank = dir_->path() + "/per_rank.json";
  RunResult r = run(calibrate("--tp 8 --out " + merged));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = run(calibrate("--tp 8 --lightllm-rank-layout --out " + per_rank));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output,
                       "LightLLM's per-rank layout for 8 ranks: num_head 8, each KV "
                       "head written by 4 ranks"))
      << r.output;
  EXPECT_EQ(load_calib(merged).num_head, 2);
  EXPECT_EQ(load_calib(per_rank).num_head, 8);

  const std::string back = dir_->path() + "/back.json", forth = dir_->path() + "/forth.json";
  r = run("convert " + per_rank + " " + back + " --to lightllm --model " + *model_);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "each written by 4 ranks")) << r.output;
  EXPECT_EQ(read_file(back), read_file(merged));
  r = run("convert " + merged + " " + forth + " --to lightllm-rank-layout --tp 8");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(read_file(forth), read_file(per_rank));

  // inspect with the model's heads merges and says so; without them it hints.
  r = run("inspect " + per_rank + " --num-kv-heads 2 --tp 8 --rank 5");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "written by 4 ranks per head: num_head 8 = 2 x 4")) << r.output;
  EXPECT_TRUE(contains(r.output, "largest disagreement 0 (every copy identical)")) << r.output;
  EXPECT_TRUE(contains(r.output, "1 (global head 1), each head replicated on 4 ranks")) << r.output;
  r = run("inspect " + per_rank);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "columns come in runs of 4 equal scales")) << r.output;
  EXPECT_TRUE(contains(r.output, "--num-kv-heads 2 merges it")) << r.output;

  // Refusals: no --tp for the per-rank layout, an unknown --to, the same file in and out.
  r = run("convert " + merged + " " + forth + " --to lightllm-rank-layout");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_TRUE(contains(r.output, "--tp N is required")) << r.output;
  r = run("convert " + merged + " " + forth + " --to vllm");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_TRUE(contains(r.output,
                       "expected lightllm, lightllm-rank-layout, vllm-checkpoint, quant-param-json "
                       "or modelopt, found vllm"))
      << r.output;
  r = run("convert " + merged + " " + merged + " --to lightllm");
  EXPECT_EQ(r.exit_code, 1) << r.output;
}

TEST_F(CalibLightLlmCli, InspectLightLlmFixtures) {
  RunResult r = run("inspect " + kDataDir + "lightllm_tp4_kv2_one_step.json --num-kv-heads 2");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "written by 2 ranks per head")) << r.output;
  EXPECT_TRUE(contains(r.output, "(layer 1, V head 0: one float32 step)")) << r.output;
  r = run("inspect " + kDataDir + "bad_lightllm_copies_disagree.json --num-kv-heads 2");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_TRUE(contains(r.output, "layer 0, K scale of head 1: its 4 copies")) << r.output;
}

TEST_F(CalibLightLlmCli, LightLlmEnvironmentNamesAreReported) {
  ::setenv("LIGHTLLM_KV_QUANT_CALIBRARTION_INFERENCE_COUNT", "1", 1);
  RunResult r = run(calibrate("--out " + dir_->path() + "/env.json"));
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "observed 1 forward passes")) << r.output;
  EXPECT_TRUE(contains(r.output,
                       "warmup from default; count from "
                       "LIGHTLLM_KV_QUANT_CALIBRARTION_INFERENCE_COUNT=1 (LightLLM's "
                       "name)"))
      << r.output;
  ::setenv("FP8KV_CALIB_COUNT", "2", 1);
  r = run(calibrate("--out " + dir_->path() + "/env.json"));
  ::unsetenv("FP8KV_CALIB_COUNT");
  ::unsetenv("LIGHTLLM_KV_QUANT_CALIBRARTION_INFERENCE_COUNT");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output,
                       "count from FP8KV_CALIB_COUNT=2, over "
                       "LIGHTLLM_KV_QUANT_CALIBRARTION_INFERENCE_COUNT=1"))
      << r.output;
}

// Files made with and without --generate, each evaluated by eval's --per-head-calib.
TEST_F(CalibLightLlmCli, GenerateAndEvalBothFiles) {
  const std::string plain = dir_->path() + "/plain.json", gen = dir_->path() + "/gen.json";
  const std::string pt = dir_->path() + "/pt.json";
  RunResult r = run(calibrate("--out " + plain));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = run(calibrate("--generate 4 --out " + gen));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  // 2 batches x (1 prefill + 4 decode steps).
  EXPECT_TRUE(contains(r.output,
                       "observed 10 forward passes per layer after 0 warmup (10 run, "
                       "8 of them decode steps"))
      << r.output;
  EXPECT_NE(read_file(plain), read_file(gen));
  r = run(calibrate("--scheme per-tensor --out " + pt));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::string eval = "eval --model " + *model_ + " --data " + *data_ +
                           " --batch 2 --per-tensor-calib " + pt + " --per-head-calib ";
  const RunResult a = run(eval + plain);
  const RunResult b = run(eval + gen);
  ASSERT_EQ(a.exit_code, 0) << a.output;
  ASSERT_EQ(b.exit_code, 0) << b.output;
  EXPECT_TRUE(contains(b.output, "fp8-per-head: scales from " + gen)) << b.output;
  // The per-head scales differ, so the fp8-per-head numbers do.
  const size_t at = a.output.find("perplexity"), bt = b.output.find("perplexity");
  ASSERT_NE(at, std::string::npos);
  ASSERT_NE(bt, std::string::npos);
  EXPECT_NE(a.output.substr(at), b.output.substr(bt));
}

}  // namespace
}  // namespace fp8kv
