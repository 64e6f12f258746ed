// KV scales as safetensors tensors (vLLM / compressed-tensors and ModelOpt names), model folders
// carrying them, vLLM checkpoint folders, and load_kv_scales over every format: round trips
// exact in float32, every refusal of tests/data/scales/bad_* named by tensor or field.
#include "fp8kv/scale_tensors.h"

#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "fp8kv/error.h"
#include "fp8kv/kv_formats.h"
#include "fp8kv/safetensors.h"
#include "runtime/test_util.h"

namespace fp8kv {
namespace {

namespace fs = std::filesystem;
const std::string kDir = std::string(FP8KV_SOURCE_DIR) + "/tests/data/scales/";

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

bool has(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

uint32_t bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}

// Awkward float32 values: long shortest text, the smallest normal, far below 1.0 (ModelOpt's
// clamp would lift them), large.
CalibData sample(QuantType type) {
  CalibData d;
  d.architectures = "LlamaForCausalLM";
  d.quant_type = type;
  d.num_layers = 3;
  d.num_head = 2;
  const std::vector<float> v = {1.0f / 3.0f, 1.17549435e-38f, 0.001f,  448.0f / 7.0f, 1e-5f, 3.0f,
                                0.0625f,     7.0e-3f,         2.5e-4f, 0.1f,          12.0f, 0.75f};
  d.scales.assign(v.begin(), v.begin() + static_cast<long>(d.num_layers) * d.row_width());
  return d;
}

void expect_same_scales(const CalibData& a, const CalibData& b) {
  EXPECT_EQ(a.quant_type, b.quant_type);
  EXPECT_EQ(a.num_layers, b.num_layers);
  ASSERT_EQ(a.scales.size(), b.scales.size());
  for (size_t i = 0; i < a.scales.size(); ++i) EXPECT_EQ(bits(a.scales[i]), bits(b.scales[i])) << i;
}

TEST(ScaleTensors, VllmRoundTripPerHeadAndPerTensorExactly) {
  TempDir dir;
  for (QuantType type : {QuantType::kPerHead, QuantType::kPerTensor}) {
    const CalibData d = sample(type);
    const std::string path = dir.path() + "/s.safetensors";
    write_scale_tensors(path, d, ScaleNaming::kVllm);
    SafetensorsFile f(path);
    const std::vector<int64_t> shape = {type == QuantType::kPerHead ? 2 : 1};
    EXPECT_EQ(f.info("model.layers.2.self_attn.v_scale").shape, shape);
    EXPECT_EQ(f.info("model.layers.0.self_attn.k_scale").dtype, DType::kF32);
    CalibExpect expect;
    expect.num_kv_heads = 2;
    const LoadedScales back = load_kv_scales(path, expect);
    EXPECT_EQ(back.format, "vllm-checkpoint");
    EXPECT_EQ(back.data.num_head, 2);
    expect_same_scales(back.data, d);
  }
}

// ModelOpt clamps exported KV scales to >= 1.0; fp8kv writes them as calibrated.
TEST(ScaleTensors, ModelOptWritesScalesBelowOneUnclamped) {
  TempDir dir;
  const CalibData d = sample(QuantType::kPerTensor);
  const std::string path = dir.path() + "/m.safetensors";
  write_scale_tensors(path, d, ScaleNaming::kModelopt);
  const std::vector<float> k =
      SafetensorsFile(path).read_f32("model.layers.0.self_attn.k_proj.k_scale", {1});
  EXPECT_EQ(bits(k[0]), bits(1.0f / 3.0f));
  const LoadedScales back = load_kv_scales(path);
  EXPECT_EQ(back.format, "modelopt");
  expect_same_scales(back.data, d);
  EXPECT_TRUE(has(error_of([&] {
                    write_scale_tensors(path, sample(QuantType::kPerHead), ScaleNaming::kModelopt);
                  }),
                  "needs --reduce max"));
}

TEST(ScaleTensors, WriteRefusesQScalesAndDraftLayersAndLeavesNoFile) {
  TempDir dir;
  const std::string path = dir.path() + "/q.safetensors";
  CalibData d = sample(QuantType::kPerHead);
  d.q_scales = QScales{2, std::vector<float>(6, 0.5f)};
  EXPECT_TRUE(
      has(error_of([&] { write_scale_tensors(path, d, ScaleNaming::kVllm); }), "--drop-q-scales"));
  d.q_scales.reset();
  d.num_target_layers = 2;
  d.num_draft_layers = 1;
  EXPECT_TRUE(has(error_of([&] { write_scale_tensors(path, d, ScaleNaming::kVllm); }),
                  "1 draft-model layers"));
  EXPECT_TRUE(fs::is_empty(dir.path()));
}

TEST(ScaleTensors, ReadsFixturesOfEachKind) {
  LoadedScales s = load_kv_scales(kDir + "ok_vllm_per_head.safetensors");
  EXPECT_EQ(s.data.quant_type, QuantType::kPerHead);
  EXPECT_EQ(s.data.num_head, 2);
  EXPECT_EQ(s.data.scales, (std::vector<float>{0.01f, 0.02f, 0.003f, 0.004f,  //
                                               0.02f, 0.04f, 0.006f, 0.008f}));
  s = load_kv_scales(kDir + "ok_vllm_bf16_scalar.safetensors");  // shape [], BF16
  EXPECT_EQ(s.data.quant_type, QuantType::kPerTensor);
  EXPECT_EQ(s.data.scales, (std::vector<float>{0.5f, 0.25f, 0.5f, 0.25f}));
  s = load_kv_scales(kDir + "ok_modelopt_per_tensor.safetensors");
  EXPECT_EQ(s.format, "modelopt");
  EXPECT_EQ(s.data.scales, (std::vector<float>{0.001f, 0.0015f, 0.002f, 0.0025f}));
  // A sharded folder: index, two shards, config.json with kv_cache_scheme attn_head.
  s = load_kv_scales(kDir + "ok_index_folder");
  EXPECT_EQ(s.data.architectures, "LlamaForCausalLM");
  EXPECT_EQ(s.data.num_head, 2);
  EXPECT_TRUE(has(s.detail, "2 files; config.json kv_cache_scheme strategy \"attn_head\""))
      << s.detail;
  // A quant-param JSON and a kv_cache_calib.json go through the same loader.
  EXPECT_EQ(load_kv_scales(kDir + "ok_quant_param_tp2.json").format, "quant-param-json");
  EXPECT_EQ(
      load_kv_scales(std::string(FP8KV_SOURCE_DIR) + "/tests/data/calib/ok_per_head.json").format,
      "lightllm");
}

TEST(ScaleTensors, ChecksTheModelAndTheScheme) {
  CalibExpect e;
  e.num_kv_heads = 4;
  EXPECT_TRUE(has(error_of([&] { load_kv_scales(kDir + "ok_vllm_per_head.safetensors", e); }),
                  "has shape [2], but the model has 4 KV heads"));
  CalibExpect t;
  t.quant_type = QuantType::kPerTensor;
  EXPECT_TRUE(has(error_of([&] { load_kv_scales(kDir + "ok_vllm_per_head.safetensors", t); }),
                  "per-head scales, but the scheme fp8-per-tensor needs per-tensor ([1]) scales; "
                  "fp8-per-tensor reads one K and one V scale per layer: `fp8kv convert "));
  // Per-tensor tensors serve a per-head scheme: loaded per_tensor with the model's KV heads,
  // broadcast by scales_for_scheme; a model of one KV head reads them as per head directly.
  CalibExpect h;
  h.quant_type = QuantType::kPerHead;
  h.num_kv_heads = 4;
  LoadedScales pt = load_kv_scales(kDir + "ok_modelopt_per_tensor.safetensors", h);
  EXPECT_EQ(pt.data.quant_type, QuantType::kPerTensor);
  EXPECT_EQ(pt.data.num_head, 4);
  const RankScales r = scales_for_scheme(pt.data, KvScheme::kFp8PerHeadBf16Q, 2, 1);
  EXPECT_TRUE(r.broadcast_from_per_tensor);
  EXPECT_EQ(r.kv, (std::vector<float>{0.001f, 0.001f, 0.0015f, 0.0015f,  // [2 layers, K 2 | V 2]
                                      0.002f, 0.002f, 0.0025f, 0.0025f}));
  h.num_kv_heads = 1;
  pt = load_kv_scales(kDir + "ok_modelopt_per_tensor.safetensors", h);
  EXPECT_EQ(pt.data.quant_type, QuantType::kPerHead);
  EXPECT_EQ(pt.data.num_head, 1);
  EXPECT_EQ(pt.data.scales, (std::vector<float>{0.001f, 0.0015f, 0.002f, 0.0025f}));
  CalibExpect a;
  a.architectures = "Qwen2ForCausalLM";
  EXPECT_TRUE(has(error_of([&] { load_kv_scales(kDir + "ok_index_folder", a); }),
                  "field 'architectures': expected \"Qwen2ForCausalLM\" (the model's), found "
                  "\"LlamaForCausalLM\""));
  CalibExpect l;
  l.num_layers = 3;
  EXPECT_TRUE(has(error_of([&] { load_kv_scales(kDir + "ok_vllm_per_head.safetensors", l); }),
                  "no tensor 'model.layers.2.self_attn.k_scale' nor "
                  "'model.layers.2.self_attn.v_scale': layer 2 of 3 has no KV scales"));
}

// Each fixture and a part of the message it must produce.
TEST(ScaleTensors, RefusesEachBadFixture) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"bad_only_v_scale",
       "no tensor 'model.layers.0.self_attn.k_scale': layer 0 has a V scale "
       "('model.layers.0.self_attn.v_scale') but no K scale (fp8kv does not substitute 1.0)"},
      {"bad_missing_layer.safetensors",
       "no tensor 'model.layers.1.self_attn.k_scale' nor 'model.layers.1.self_attn.v_scale'"},
      {"bad_mixed_naming.safetensors", "uses modelopt names but"},
      {"bad_shape_2d.safetensors",
       "tensor 'model.layers.0.self_attn.k_scale' has shape [2, 1]: expected [1] (per tensor) "
       "or [num_kv_heads] (per head)"},
      {"bad_shape_mismatch.safetensors",
       "tensor 'model.layers.0.self_attn.v_scale' has shape [1] but "
       "'model.layers.0.self_attn.k_scale' has shape [2]"},
      {"bad_scale_zero.safetensors",
       "tensor 'model.layers.0.self_attn.k_scale', head 1: expected a finite scale > 0, found 0"},
      {"bad_scale_nan.safetensors",
       "tensor 'model.layers.0.self_attn.v_scale': expected a finite scale > 0, found nan"},
      {"bad_scale_negative.safetensors", "found -0.1"},
      {"bad_no_scales.safetensors", "no KV scale tensors"},
      {"bad_truncated.safetensors", "header length 1000 exceeds the file"},
      {"bad_strategy_mismatch",
       "field 'quantization_config.kv_cache_scheme.strategy': \"attn_head\", but tensor "
       "'model.layers.0.self_attn.k_scale' has shape [1] (per tensor, strategy \"tensor\")"},
      {"bad_scheme_bits",
       "field 'quantization_config.kv_cache_scheme.num_bits': expected 8 (an FP8 cache), found 4"},
      {"bad_scheme_dynamic", "field 'quantization_config.kv_cache_scheme.dynamic': expected false"},
      {"bad_heads_mismatch", "has shape [2], but the model has 4 KV heads"},
      {"bad_layer_beyond_model", "is for layer 1, but the model has 1 layers"},
      {"bad_duplicate_files", "tensor 'model.layers.0.self_attn.k_scale' is in both"},
  };
  for (const auto& [file, part] : cases) {
    const std::string message = error_of([&] { load_kv_scales(kDir + file); });
    EXPECT_TRUE(has(message, part)) << file << ": " << message;
  }
}

// A model folder with an index and a config without quantization_config.
struct ModelFolder {
  TempDir dir;
  std::string path;
  explicit ModelFolder(const nlohmann::json& quantization_config = nullptr) {
    path = dir.path() + "/model";
    fs::create_directories(path);
    nlohmann::json config = {{"architectures", {"LlamaForCausalLM"}},
                             {"model_type", "llama"},
                             {"num_hidden_layers", 3},
                             {"num_key_value_heads", 2},
                             {"rms_norm_eps", 1e-5},
                             {"vocab_size", 100}};
    if (!quantization_config.is_null()) config["quantization_config"] = quantization_config;
    std::ofstream(path + "/config.json") << config.dump(2);
    write_safetensors(path + "/model-00001-of-00001.safetensors",
                      {{"model.embed_tokens.weight", DType::kF32, {2}}},
                      [](size_t, uint8_t* dst, size_t bytes) { std::memset(dst, 0, bytes); });
    std::ofstream(path + "/model.safetensors.index.json") << nlohmann::json{
        {"metadata", nlohmann::json::object()},
        {"weight_map",
         {{"model.embed_tokens.weight",
           "model-00001-of-00001.safetensors"}}}}.dump();
  }
};

TEST(VllmCheckpoint, WritesConfigEntryTensorsAndIndexAndReadsBack) {
  ModelFolder model;
  const std::string out = model.dir.path() + "/served";
  const CalibData d = sample(QuantType::kPerHead);
  const CheckpointWritten w = write_vllm_checkpoint(out, model.path, d);
  EXPECT_TRUE(w.new_quantization_config);
  EXPECT_EQ(w.strategy, "attn_head");
  const nlohmann::json config = nlohmann::json::parse(slurp(out + "/config.json"));
  const nlohmann::json want = {{"num_bits", 8},
                               {"type", "float"},
                               {"strategy", "attn_head"},
                               {"symmetric", true},
                               {"dynamic", false}};
  EXPECT_EQ(config["quantization_config"]["kv_cache_scheme"], want);
  EXPECT_EQ(config["quantization_config"]["quant_method"], "compressed-tensors");
  EXPECT_EQ(config["rms_norm_eps"], 1e-5);  // the rest of the config as it was
  EXPECT_EQ(config["vocab_size"], 100);
  const nlohmann::json index = nlohmann::json::parse(slurp(out + "/model.safetensors.index.json"));
  EXPECT_EQ(index["weight_map"]["model.layers.2.self_attn.v_scale"], "kv_scales.safetensors");
  EXPECT_EQ(index["weight_map"]["model.embed_tokens.weight"], "model-00001-of-00001.safetensors");
  // With the weights beside it, the folder reads back through its index, bit for bit.
  fs::copy_file(model.path + "/model-00001-of-00001.safetensors",
                out + "/model-00001-of-00001.safetensors");
  CalibExpect expect;
  expect.architectures = "LlamaForCausalLM";
  expect.num_layers = 3;
  expect.num_kv_heads = 2;
  expect.quant_type = QuantType::kPerHead;
  const LoadedScales back = load_kv_scales(out, expect);
  expect_same_scales(back.data, d);
  // The source model is untouched.
  EXPECT_FALSE(
      nlohmann::json::parse(slurp(model.path + "/config.json")).contains("quantization_config"));
}

TEST(VllmCheckpoint, KeepsACompressedTensorsConfigAndRefusesOthers) {
  ModelFolder ct(
      nlohmann::json{{"quant_method", "compressed-tensors"}, {"format", "float-quantized"}});
  const std::string out = ct.dir.path() + "/served";
  const CheckpointWritten w = write_vllm_checkpoint(out, ct.path, sample(QuantType::kPerTensor));
  EXPECT_FALSE(w.new_quantization_config);
  const nlohmann::json q =
      nlohmann::json::parse(slurp(out + "/config.json"))["quantization_config"];
  EXPECT_EQ(q["format"], "float-quantized");
  EXPECT_EQ(q["kv_cache_scheme"]["strategy"], "tensor");

  ModelFolder fp8(nlohmann::json{{"quant_method", "modelopt"}});
  const std::string out2 = fp8.dir.path() + "/served";
  EXPECT_TRUE(
      has(error_of([&] { write_vllm_checkpoint(out2, fp8.path, sample(QuantType::kPerHead)); }),
          "field 'quantization_config.quant_method': expected \"compressed-tensors\" (only "
          "that config takes a kv_cache_scheme; a ModelOpt model: --to modelopt), found a "
          "string \"modelopt\""));
  EXPECT_FALSE(fs::exists(out2));

  ModelFolder plain;
  EXPECT_TRUE(has(
      error_of([&] { write_vllm_checkpoint(plain.path, plain.path, sample(QuantType::kPerHead)); }),
      "is the model folder itself"));
  CalibData four = sample(QuantType::kPerTensor);
  four.num_layers = 2;
  four.scales.resize(4);
  EXPECT_TRUE(has(error_of([&] { write_vllm_checkpoint(out2, plain.path, four); }),
                  "field 'num_hidden_layers': 3, but the scales have 2 layers"));
  // A model that carries scales already.
  EXPECT_TRUE(has(error_of([&] {
                    write_vllm_checkpoint(plain.dir.path() + "/x", kDir + "ok_index_folder",
                                          load_kv_scales(kDir + "ok_index_folder").data);
                  }),
                  "the model already carries KV scale tensors"));
}

}  // namespace
}  // namespace fp8kv
