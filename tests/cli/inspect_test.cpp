// fp8kv inspect, run as the built binary.
#include <gtest/gtest.h>

#include <string>

#include "cli/run_fp8kv.h"

namespace {

const std::string kSourceDir = FP8KV_SOURCE_DIR;
const std::string kLightLlmFile = kSourceDir + "/examples/lightllm_per_tensor_qwen2.5_32b.json";

using fp8kv::testing::contains;
using fp8kv::testing::run_fp8kv;
using fp8kv::testing::RunResult;

// Every printed line fits a 100-column terminal.
void expect_fits_100_columns(const std::string& output) {
  size_t start = 0;
  while (start < output.size()) {
    size_t end = output.find('\n', start);
    if (end == std::string::npos) end = output.size();
    EXPECT_LE(end - start, 100u) << output.substr(start, end - start);
    start = end + 1;
  }
}

TEST(InspectCli, LightLlmFile) {
  const RunResult r = run_fp8kv("inspect '" + kLightLlmFile +
                                "' --arch Qwen2ForCausalLM --num-layers 64 --num-kv-heads 8 "
                                "--scheme per-tensor");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "per_tensor")) << r.output;
  EXPECT_TRUE(contains(r.output, "layers        64")) << r.output;
  EXPECT_TRUE(contains(r.output, "Qwen2ForCausalLM")) << r.output;
  EXPECT_TRUE(contains(r.output, "K scales      min 2.525e-02")) << r.output;
  EXPECT_TRUE(contains(r.output, "   63  6.501e-02  7.812e-02")) << r.output;  // last row
  EXPECT_TRUE(contains(r.output, "  ...")) << r.output;                        // elided
  expect_fits_100_columns(r.output);
}

TEST(InspectCli, MalformedFileExitsNonZero) {
  const RunResult r =
      run_fp8kv("inspect '" + kSourceDir + "/tests/data/calib/bad_scales_row_length.json'");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_TRUE(contains(r.output, "fp8kv: error: ")) << r.output;
  EXPECT_TRUE(contains(r.output, "field 'scales': row 1: expected 4 values")) << r.output;
}

TEST(InspectCli, WrongKvHeads) {
  // 8 is not a multiple of 3 (a multiple would be LightLLM's per-rank layout).
  const RunResult r = run_fp8kv("inspect '" + kLightLlmFile + "' --num-kv-heads 3");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_TRUE(contains(r.output,
                       "field 'num_head': expected 3 (the model's KV heads) or a multiple of it "
                       "(LightLLM's per-rank layout), found 8"))
      << r.output;
}

// A per_head file for fp8-per-tensor is refused (it would need a reduction); a per_tensor file
// serves a per-head scheme, broadcast, and inspect says so.
TEST(InspectCli, WrongScheme) {
  RunResult r = run_fp8kv("inspect '" + kSourceDir +
                          "/tests/data/calib/ok_per_head.json' --scheme fp8-per-tensor");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_TRUE(contains(r.output, "field 'quant_type': expected \"per_tensor\"")) << r.output;
  EXPECT_TRUE(contains(r.output, "--to lightllm --reduce max")) << r.output;
  r = run_fp8kv("inspect '" + kLightLlmFile + "' --scheme fp8-per-head");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "file rules and quant_type: OK")) << r.output;
  EXPECT_TRUE(contains(r.output,
                       "fp8-per-head reads it broadcast: each layer's K and V scale for "
                       "every KV head"))
      << r.output;
}

TEST(InspectCli, RankSlice) {
  RunResult r = run_fp8kv("inspect '" + kLightLlmFile + "' --tp 2 --rank 1");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "tensor parallel: rank 1 of 2")) << r.output;
  EXPECT_TRUE(contains(r.output, "4 (global heads 4..7)")) << r.output;

  // Per head with more ranks than heads: rank 3 of 4 holds head 1 (of 2), replicated twice.
  r = run_fp8kv("inspect '" + kSourceDir +
                "/tests/data/calib/ok_per_head_q.json' --tp 4 --rank 3 --scheme per-head");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "1 (global head 1), each head replicated on 2 ranks")) << r.output;
  EXPECT_TRUE(contains(r.output, "rank 3: K scales")) << r.output;
  EXPECT_TRUE(contains(r.output, "    1  3.800e-02")) << r.output;  // K of head 1, layer 1
  EXPECT_TRUE(contains(r.output, "rank 3: Q scales")) << r.output;
  expect_fits_100_columns(r.output);

  // tp that does not fit the heads; --tp without --rank.
  r = run_fp8kv("inspect '" + kLightLlmFile + "' --tp 3 --rank 0");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_TRUE(contains(r.output, "tensor parallel size 3 and num_head 8")) << r.output;
  r = run_fp8kv("inspect '" + kLightLlmFile + "' --tp 2");
  EXPECT_NE(r.exit_code, 0) << r.output;
  r = run_fp8kv("inspect '" + kLightLlmFile + "' --tp 2 --rank 2");
  EXPECT_EQ(r.exit_code, 1) << r.output;
}

TEST(InspectCli, HelpAndMissingFile) {
  RunResult r = run_fp8kv("inspect --help");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "--num-kv-heads")) << r.output;
  EXPECT_TRUE(contains(r.output, "--scheme")) << r.output;
  r = run_fp8kv("inspect /nonexistent/kv_cache_calib.json");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_TRUE(contains(r.output, "/nonexistent/kv_cache_calib.json: cannot open")) << r.output;
}

}  // namespace
