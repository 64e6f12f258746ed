// convert / inspect / generate --calib across the scale formats (docs/FORMATS.md, "Other
// engines' formats"), run as the built binary on the tiny model: a calibration written as a
// vLLM checkpoint folder, ModelOpt tensors or a quant-param JSON serves the same tokens as the
// kv_cache_calib.json it came from, and converts back byte for byte where the format is exact.
#include <gtest/gtest.h>

#include <filesystem>
#include <string>

#include "cli/run_fp8kv.h"
#include "runtime/test_util.h"

namespace fp8kv {
namespace {

namespace fs = std::filesystem;
using testing::contains;
using testing::read_file;
using testing::RunResult;
using testing::token_lines;
RunResult run(const std::string& args) { return testing::run_fp8kv(args); }

const std::string kScales = std::string(FP8KV_SOURCE_DIR) + "/tests/data/scales/";

class ScaleFormatsCli : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    model_ = new std::string(dir_->path() + "/tiny");
    const std::string data = dir_->path() + "/data.jsonl";
    ASSERT_EQ(run("make-model " + *model_ + " --preset tiny").exit_code, 0);
    testing::write_tiny_token_data(data);
    for (const char* scheme : {"per-head", "per-tensor"}) {
      const RunResult r =
          run("calibrate --model " + *model_ + " --data " + data + " --batch 2 --scheme " + scheme +
              " --out " + dir_->path() + "/" + scheme + ".json");
      ASSERT_EQ(r.exit_code, 0) << r.output;
    }
  }
  static void TearDownTestSuite() {
    delete model_;
    delete dir_;
  }
  static std::string path(const std::string& name) { return dir_->path() + "/" + name; }
  static std::string tokens(const std::string& kv, const std::string& calib) {
    const RunResult r = run("generate --model " + *model_ + " --kv " + kv + " --calib " + calib +
                            " --input-ids 3,1,4,1,5 --input-ids 9,2,6 --max-new 6");
    EXPECT_EQ(r.exit_code, 0) << r.output;
    return token_lines(r.output);
  }
  static TempDir* dir_;
  static std::string* model_;
};

TempDir* ScaleFormatsCli::dir_ = nullptr;
std::string* ScaleFormatsCli::model_ = nullptr;

// lightllm -> vllm-checkpoint folder -> serve it -> lightllm again, byte for byte.
TEST_F(ScaleFormatsCli, VllmCheckpointFolderServesTheSameScales) {
  const std::string served = path("served");
  RunResult r = run("convert " + path("per-head.json") + " " + served +
                    " --to vllm-checkpoint --model " + *model_);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output,
                       "kv_cache_scheme strategy \"attn_head\" (a compressed-tensors "
                       "quantization_config added)"))
      << r.output;
  EXPECT_TRUE(fs::exists(served + "/kv_scales.safetensors"));
  EXPECT_FALSE(fs::exists(served + "/model.safetensors.index.json"));  // the model has none
  fs::copy_file(*model_ + "/model.safetensors", served + "/model.safetensors");

  const std::string want = tokens("fp8-per-head", path("per-head.json"));
  ASSERT_FALSE(want.empty());
  EXPECT_EQ(tokens("fp8-per-head", served), want);

  r = run("inspect " + served);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output,
                       "format        vllm-checkpoint (4 layers of [2] tensors in 2 "
                       "files; config.json kv_cache_scheme strategy \"attn_head\")"))
      << r.output;
  r = run("convert " + served + " " + path("back.json") + " --to lightllm");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(read_file(path("back.json")), read_file(path("per-head.json")));

  // A per-tensor cache asked of per-head tensors: refused, naming both.
  r = run("generate --model " + *model_ + " --kv fp8-per-tensor --calib " + served +
          " --input-ids 1,2 --max-new 1");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_TRUE(contains(r.output,
                       "per-head scales, but the scheme fp8-per-tensor needs "
                       "per-tensor ([1]) scales"))
      << r.output;
  // Writing over the model folder itself is refused.
  r = run("convert " + path("per-head.json") + " " + *model_ + " --to vllm-checkpoint --model " +
          *model_);
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_TRUE(contains(r.output, "is the model folder itself")) << r.output;
}

TEST_F(ScaleFormatsCli, ModelOptTensorsServeTheSameScales) {
  const std::string m = path("modelopt.safetensors");
  RunResult r = run("convert " + path("per-tensor.json") + " " + m + " --to modelopt");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "no >= 1.0 clamp")) << r.output;
  EXPECT_EQ(tokens("fp8-per-tensor", m), tokens("fp8-per-tensor", path("per-tensor.json")));
  // eval takes the tensors too (and a vLLM folder for per-head).
  r = run("convert " + path("per-head.json") + " " + path("vllm.safetensors") +
          " --to vllm-checkpoint");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  testing::write_tiny_token_data(path("eval.jsonl"));
  r = run("eval --model " + *model_ + " --data " + path("eval.jsonl") + " --batch 2 " +
          "--per-tensor-calib " + m + " --per-head-calib " + path("vllm.safetensors") +
          " --kv-bf16-layers 2");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "fp8-per-tensor: scales from " + m)) << r.output;
  EXPECT_TRUE(contains(r.output, "perplexity")) << r.output;
  EXPECT_TRUE(contains(r.output, "(--kv-bf16-layers 2: kept in bf16 in every FP8 cache"))
      << r.output;
  EXPECT_TRUE(contains(r.output, "fp8-per-head: layers losing most ")) << r.output;
  r = run("convert " + m + " " + path("pt-back.json") + " --to lightllm --model " + *model_);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(read_file(path("pt-back.json")), read_file(path("per-tensor.json")));

  // Per-head into a per-tensor-only format: refused unless --reduce max.
  r = run("convert " + path("per-head.json") + " " + path("x.safetensors") + " --to modelopt");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_TRUE(contains(r.output, "--reduce max takes each layer's max over its heads")) << r.output;
  EXPECT_FALSE(fs::exists(path("x.safetensors")));
  // --reduce max into LightLLM's own file writes per_tensor scales, each layer's max over its
  // heads: byte for byte the file a per-tensor calibration on the same data writes, which
  // fp8-per-tensor takes (the per_head file it refuses, naming this command).
  r = run("generate --model " + *model_ + " --kv fp8-per-tensor --calib " + path("per-head.json") +
          " --input-ids 1,2");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_TRUE(contains(r.output, "--to lightllm --reduce max")) << r.output;
  r = run("convert " + path("per-head.json") + " " + path("ph-reduced.json") +
          " --to lightllm --reduce max --model " + *model_);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "reduced per_head to per_tensor")) << r.output;
  EXPECT_EQ(read_file(path("ph-reduced.json")), read_file(path("per-tensor.json")));
  // Without --reduce the heads are kept: the per_head file as it was.
  r = run("convert " + path("per-head.json") + " " + path("ph-kept.json") +
          " --to lightllm --model " + *model_);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(read_file(path("ph-kept.json")), read_file(path("per-head.json")));
}

TEST_F(ScaleFormatsCli, QuantParamJsonListsEveryRank) {
  const std::string qp = path("qp.json");
  RunResult r = run("convert " + path("per-head.json") + " " + qp + " --to quant-param-json");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_TRUE(contains(r.output, "--reduce max")) << r.output;
  EXPECT_FALSE(fs::exists(qp));
  r = run("convert " + path("per-head.json") + " " + qp +
          " --to quant-param-json --reduce max --tp 2 --model " + *model_);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "reduced per_head to per_tensor")) << r.output;
  EXPECT_TRUE(contains(r.output,
                       "quant-param JSON for tp 2 (ranks 0..1 listed), 4 layers, "
                       "model_type llama; K and V share one scale per layer: max(k, v)"))
      << r.output;
  r = run("inspect " + qp);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "format        quant-param-json")) << r.output;
  EXPECT_TRUE(contains(r.output, "KV heads      (not in this format)")) << r.output;
  EXPECT_FALSE(tokens("fp8-per-tensor", qp).empty());
  // Back to a kv_cache_calib.json needs the model's heads and architectures.
  r = run("convert " + qp + " " + path("qp-back.json") + " --to lightllm");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_TRUE(contains(r.output, "give --model DIR or --num-kv-heads N")) << r.output;
  r = run("convert " + qp + " " + path("qp-back.json") + " --to lightllm --model " + *model_);
  EXPECT_EQ(r.exit_code, 0) << r.output;
}

// --kv-bf16-layers on generate: every layer in bf16 generates what the bf16 cache does; a
// layer the model lacks, a bad list and a bf16 cache are refused before anything runs.
TEST_F(ScaleFormatsCli, Bf16LayersOnGenerate) {
  const std::string bf16 = token_lines(
      run("generate --model " + *model_ + " --input-ids 3,1,4,1,5 --input-ids 9,2,6 --max-new 6")
          .output);
  ASSERT_FALSE(bf16.empty());
  EXPECT_EQ(tokens("fp8-per-head --kv-bf16-layers 0,1,2,3", path("per-head.json")), bf16);
  const std::string gen = "generate --model " + *model_ + " --input-ids 1,2 --max-new 1 ";
  RunResult r =
      run(gen + "--kv fp8-per-head --calib " + path("per-head.json") + " --kv-bf16-layers 0,4");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_TRUE(contains(r.output, "--kv-bf16-layers: layer 4, but the model has 4 layers (0..3)"))
      << r.output;
  r = run(gen + "--kv fp8-per-head --calib " + path("per-head.json") + " --kv-bf16-layers 0,x");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_TRUE(contains(r.output, "found 'x' in '0,x'")) << r.output;
  r = run(gen + "--kv bf16 --kv-bf16-layers 0");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_TRUE(contains(r.output, "--kv-bf16-layers is only for the FP8 caches")) << r.output;
}

// A checkpoint with a V scale and no K scale is refused, naming the missing tensor: never
// served with a K scale of 1.0.
TEST_F(ScaleFormatsCli, OnlyVScaleIsRefusedNamingTheKScale) {
  const RunResult r = run("inspect " + kScales + "bad_only_v_scale");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_TRUE(contains(r.output,
                       "no tensor 'model.layers.0.self_attn.k_scale': layer 0 has a V "
                       "scale"))
      << r.output;
}

}  // namespace
}  // namespace fp8kv
