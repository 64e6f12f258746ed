// What a real checkpoint folder holds and a made test model does not: sharded indexes with
// mistakes, shards with extra tensors, generation/tokenizer files, fp16 weights; and make-model's
// bytes independent of how it is written.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include "fp8kv/backend.h"
#include "fp8kv/error.h"
#include "fp8kv/fp8.h"
#include "fp8kv/make_model.h"
#include "fp8kv/model.h"
#include "fp8kv/model_ops.h"
#include "fp8kv/safetensors.h"
#include "fp8kv/tokenizer.h"
#include "runtime/test_util.h"

namespace fp8kv {
namespace {

namespace fs = std::filesystem;

// A tensor to write: values stored as `dtype`; each must be exact in it (checked).
struct OutTensor {
  std::string name;
  DType dtype = DType::kBF16;
  std::vector<int64_t> shape;
  std::vector<float> values;
};

void write_file(const std::string& path, const std::vector<OutTensor>& tensors) {
  std::vector<TensorSpec> specs;
  for (const OutTensor& t : tensors) specs.push_back({t.name, t.dtype, t.shape});
  write_safetensors(path, specs, [&](size_t i, uint8_t* dst, size_t bytes) {
    const OutTensor& t = tensors[i];
    ASSERT_EQ(bytes, t.values.size() * dtype_bytes(t.dtype)) << t.name;
    for (size_t e = 0; e < t.values.size(); ++e) {
      const float x = t.values[e];
      if (t.dtype == DType::kF32) {
        std::memcpy(dst + 4 * e, &x, 4);
        continue;
      }
      const bool bf = t.dtype == DType::kBF16;
      const uint16_t h = bf ? float_to_bf16(x) : float_to_f16(x);
      ASSERT_EQ(bf ? bf16_to_float(h) : f16_to_float(h), x) << t.name << " element " << e;
      std::memcpy(dst + 2 * e, &h, 2);
    }
  });
}

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void write_text(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::trunc);
  out << text;
}

// One layer of the tiny model with a small vocabulary: made in well under a second.
ModelConfig small_config() {
  ModelConfig c = model_preset("tiny");
  c.num_layers = 1;
  c.vocab_size = 512;
  return c;
}

// Every tensor of a model folder as float32 (exact for bf16, f16 and f32 files).
std::vector<OutTensor> tensors_of(const std::string& dir) {
  WeightStore store(dir);
  std::vector<OutTensor> out;
  for (const std::string& n : store.names()) {
    const TensorInfo& t = store.info(n);
    out.push_back({n, t.dtype, t.shape, store.read_f32(n, t.shape)});
  }
  return out;
}

// A copy of a made model's config.json in `to` (a fresh folder).
void copy_config(const std::string& from, const std::string& to) {
  fs::create_directories(to);
  fs::copy_file(from + "/config.json", to + "/config.json");
}

const std::vector<int32_t> kPrompt = {1, 17, 300, 5, 511, 42, 7};

// The logits of kPrompt (every position) on the CPU backend.
std::vector<float> logits_of(const Model& model, Backend& backend) {
  auto ops = make_cpu_model_ops();
  RunnerOptions o;
  o.num_slots = 64;
  o.max_requests = 1;
  o.max_len = 32;
  ModelRunner runner(model, backend, *ops, o);
  const int r = runner.add_request();
  return runner.forward({r}, {kPrompt}, LogitRows::kAll);
}

std::vector<float> logits_of(const std::string& dir) {
  auto backend = make_cpu_backend();
  return logits_of(*Model::load(dir, *backend), *backend);
}

// Byte-for-byte equality of two models' weight buffers (the CPU backend's memory is the host's).
void expect_same_weights(const Model& a, const Model& b) {
  auto same = [](const BackendBuffer& x, const BackendBuffer& y, const std::string& what) {
    ASSERT_EQ(x.bytes(), y.bytes()) << what;
    EXPECT_EQ(x.bytes() ? std::memcmp(x.get(), y.get(), x.bytes()) : 0, 0) << what;
  };
  ASSERT_EQ(a.config().num_layers, b.config().num_layers);
  for (int l = 0; l < a.config().num_layers; ++l) {
    const LayerWeights &x = a.layer(l), &y = b.layer(l);
    same(x.attn_norm, y.attn_norm, "attn_norm");
    same(x.w_qkv, y.w_qkv, "w_qkv");
    same(x.b_qkv, y.b_qkv, "b_qkv");
    same(x.w_o, y.w_o, "w_o");
    same(x.mlp_norm, y.mlp_norm, "mlp_norm");
    same(x.w_gate_up, y.w_gate_up, "w_gate_up");
    same(x.w_down, y.w_down, "w_down");
  }
}

class CheckpointTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    make_model(dir_->path() + "/made", small_config(), 3);
  }
  static void TearDownTestSuite() { delete dir_; }
  static std::string made() { return dir_->path() + "/made"; }
  static TempDir* dir_;
};
TempDir* CheckpointTest::dir_ = nullptr;

TEST(Checkpoint, IndexListingATensorTwiceIsRefusedNamingIt) {
  TempDir dir;
  write_file(dir.path() + "/a.safetensors", {{"x", DType::kF32, {2}, {1, 2}}});
  write_file(dir.path() + "/b.safetensors", {{"y", DType::kF32, {1}, {3}}});
  // A top-level key equal to a tensor name ("x" in metadata) is no duplicate.
  write_text(
      dir.path() + "/model.safetensors.index.json",
      R"({"metadata": {"x": 1}, "weight_map": {"x": "a.safetensors", "y": "b.safetensors"}})");
  EXPECT_EQ(WeightStore(dir.path()).read_f32("x", {2}), (std::vector<float>{1, 2}));

  write_text(
      dir.path() + "/model.safetensors.index.json",
      R"({"weight_map": {"x": "a.safetensors", "y": "b.safetensors", "x": "b.safetensors"}})");
  const std::string e = error_of([&] { WeightStore s(dir.path()); });
  EXPECT_NE(e.find("model.safetensors.index.json"), std::string::npos) << e;
  EXPECT_NE(e.find("'x' twice"), std::string::npos) << e;
}

TEST(Checkpoint, IndexNamingAMissingShardIsRefusedNamingIt) {
  TempDir dir;
  write_file(dir.path() + "/model-00001-of-00002.safetensors", {{"x", DType::kF32, {2}, {1, 2}}});
  write_text(dir.path() + "/model.safetensors.index.json",
             R"({"weight_map": {"x": "model-00001-of-00002.safetensors",
                                "y": "model-00002-of-00002.safetensors"}})");
  const std::string e = error_of([&] { WeightStore s(dir.path()); });
  EXPECT_NE(e.find("'model-00002-of-00002.safetensors'"), std::string::npos) << e;
  EXPECT_NE(e.find("does not exist"), std::string::npos) << e;
}

TEST(Checkpoint, TensorInTwoFilesWithoutIndexIsRefused) {
  TempDir dir;
  write_file(dir.path() + "/part-a.safetensors",
             {{"x", DType::kF32, {2}, {1, 2}}, {"y", DType::kF32, {1}, {3}}});
  write_file(dir.path() + "/part-b.safetensors", {{"z", DType::kF32, {1}, {4}}});
  // Distinct tensors in several files, no index: all of them.
  WeightStore ok(dir.path());
  EXPECT_EQ(ok.names(), (std::vector<std::string>{"x", "y", "z"}));
  EXPECT_EQ(ok.file_name_of("z"), "part-b.safetensors");

  write_file(dir.path() + "/part-b.safetensors",
             {{"z", DType::kF32, {1}, {4}}, {"y", DType::kF32, {1}, {5}}});
  const std::string e = error_of([&] { WeightStore s(dir.path()); });
  EXPECT_NE(e.find("'y'"), std::string::npos) << e;
  EXPECT_NE(e.find("part-a.safetensors"), std::string::npos) << e;
  EXPECT_NE(e.find("part-b.safetensors"), std::string::npos) << e;
}

TEST_F(CheckpointTest, ShardExtrasAreIgnoredAndSaidOnce) {
  // The made model in two shards with an index, plus what real checkpoints carry: a tensor the
  // index lists that the model does not use (a rotary cache), a shard tensor the index does not
  // list, and a second (zeroed) copy of model.norm.weight in the shard the index does not place
  // it in.
  TempDir dir;
  copy_config(made(), dir.path());
  std::vector<OutTensor> a, b;
  std::string index = R"({"metadata": {}, "weight_map": {)";
  for (OutTensor& t : tensors_of(made())) {
    const bool first = t.name.find("mlp") == std::string::npos;
    index += "\"" + t.name + "\": \"" + (first ? "a" : "b") + ".safetensors\", ";
    if (t.name == "model.norm.weight") {
      b.push_back({t.name, t.dtype, t.shape, std::vector<float>(t.values.size(), 0.0f)});
    }
    (first ? a : b).push_back(std::move(t));
  }
  a.push_back({"model.layers.0.self_attn.rotary_emb.inv_freq",
               DType::kF32,
               {32},
               std::vector<float>(32, 0.5f)});
  b.push_back({"extra.unlisted", DType::kBF16, {4, 4}, std::vector<float>(16, 1.0f)});
  index += R"("model.layers.0.self_attn.rotary_emb.inv_freq": "a.safetensors"}})";
  write_file(dir.path() + "/a.safetensors", a);
  write_file(dir.path() + "/b.safetensors", b);
  write_text(dir.path() + "/model.safetensors.index.json", index);

  WeightStore store(dir.path());
  ASSERT_EQ(store.unlisted().size(), 2u);
  for (const auto& u : store.unlisted()) {
    EXPECT_EQ(u.file, "b.safetensors") << u.tensor;
    EXPECT_TRUE(u.tensor == "extra.unlisted" || u.tensor == "model.norm.weight") << u.tensor;
  }
  EXPECT_FALSE(store.has("extra.unlisted"));
  EXPECT_EQ(store.file_name_of("model.norm.weight"), "a.safetensors");

  auto backend = make_cpu_backend();
  testing::internal::CaptureStderr();
  std::unique_ptr<Model> model;
  const std::string e = error_of([&] { model = Model::load(dir.path(), *backend, true); });
  const std::string err = testing::internal::GetCapturedStderr();
  ASSERT_EQ(e, "(no error)");
  // One line for all three, naming how many and the first.
  EXPECT_NE(err.find("ignoring 3 tensors the model does not use (first: "), std::string::npos)
      << err;
  EXPECT_EQ(err.find("ignoring"), err.rfind("ignoring")) << err;
  EXPECT_NE(err.find("loaded " + dir.path() + " in "), std::string::npos) << err;
  // The index's placement wins: the same logits as the made model (not a zero final norm).
  EXPECT_EQ(logits_of(*model, *backend), logits_of(made()));
}

TEST_F(CheckpointTest, GenerationConfigAndTokenizerFilesAreNoWeights) {
  TempDir dir;
  for (const auto& e : fs::directory_iterator(made())) {
    fs::copy_file(e.path(), dir.path() + "/" + e.path().filename().string());
  }
  write_text(dir.path() + "/generation_config.json",
             R"({"bos_token_id": 128000, "do_sample": true, "eos_token_id": [128001, 128009],
                 "temperature": 0.6, "top_p": 0.9, "transformers_version": "4.43.0"})");
  fs::copy_file(std::string(FP8KV_SOURCE_DIR) + "/tests/data/tokenizer/llama3_tiny.json",
                dir.path() + "/tokenizer.json");
  write_text(dir.path() + "/tokenizer_config.json",
             R"({"bos_token": "<|begin_of_text|>", "model_max_length": 131072,
                 "tokenizer_class": "PreTrainedTokenizerFast"})");
  write_text(dir.path() + "/special_tokens_map.json", R"({"bos_token": "<|begin_of_text|>"})");

  EXPECT_EQ(WeightStore(dir.path()).names(), WeightStore(made()).names());
  EXPECT_EQ(logits_of(dir.path()), logits_of(made()));
  // The folder's tokenizer is the one a model folder argument finds.
  EXPECT_GT(Tokenizer::load(dir.path()).vocab_size(), 0);
}

// A value exact in both bf16 and fp16 near x (0 for the few that are not: deep fp16
// subnormals).
float both_exact(float x) {
  const float b = bf16_to_float(float_to_bf16(f16_to_float(float_to_f16(x))));
  return f16_to_float(float_to_f16(b)) == b ? b : 0.0f;
}

TEST_F(CheckpointTest, Fp16CheckpointLoadsExactlyAsBf16) {
  // The made model with every value exact in both types, written once as bf16 (one file) and
  // once as fp16 (two shards with an index): float32 weights and logits are the same bits, and
  // so are tensor-parallel slices taken while copying.
  TempDir dir;
  const std::string bf = dir.path() + "/bf16", hf = dir.path() + "/f16";
  copy_config(made(), bf);
  copy_config(made(), hf);
  std::vector<OutTensor> tensors = tensors_of(made());
  size_t changed = 0, total = 0;
  for (OutTensor& t : tensors) {
    for (float& x : t.values) {
      const float y = both_exact(x);
      changed += y != x;
      x = y;
    }
    total += t.values.size();
  }
  // Nearly all bf16 values of the made model are exact in fp16 too (not those below 2^-17).
  EXPECT_LT(changed * 1000, total);
  write_file(bf + "/model.safetensors", tensors);
  std::vector<OutTensor> a, b;
  std::string index = R"({"weight_map": {)";
  for (size_t i = 0; i < tensors.size(); ++i) {
    OutTensor t = tensors[i];
    t.dtype = DType::kF16;
    index += (i ? ", \"" : "\"") + t.name + "\": \"" + (i % 2 ? "b" : "a") + ".safetensors\"";
    (i % 2 ? b : a).push_back(std::move(t));
  }
  write_file(hf + "/a.safetensors", a);
  write_file(hf + "/b.safetensors", b);
  write_text(hf + "/model.safetensors.index.json", index + "}}");
  ASSERT_EQ(WeightStore(hf).info("model.embed_tokens.weight").dtype, DType::kF16);

  auto backend = make_cpu_backend();
  auto from_bf = Model::load(bf, *backend), from_hf = Model::load(hf, *backend);
  expect_same_weights(*from_bf, *from_hf);
  const std::vector<float> logits = logits_of(*from_hf, *backend);
  ASSERT_EQ(logits.size(), kPrompt.size() * 512u);
  EXPECT_EQ(logits, logits_of(*from_bf, *backend));
  for (int rank = 0; rank < 2; ++rank) {
    auto x = Model::load(bf, *backend, false, WeightDtype::kF32, 2, rank);
    auto y = Model::load(hf, *backend, false, WeightDtype::kF32, 2, rank);
    SCOPED_TRACE("tp 2 rank " + std::to_string(rank));
    expect_same_weights(*x, *y);
  }
}

TEST(MakeModel, BytesIndependentOfThreadsAndPieceSize) {
  TempDir dir;
  const ModelConfig c = small_config();
  const uint64_t shard = 1 << 20;  // several shards with an index
  make_model(dir.path() + "/one", c, 5, shard, false, {1, 64ull << 20});
  // Pieces of 4098 bytes start inside the writer's random chunks and inside rows.
  make_model(dir.path() + "/many", c, 5, shard, false, {3, 4098});
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir.path() + "/one")) {
    names.push_back(e.path().filename().string());
  }
  EXPECT_GT(names.size(), 3u);  // config, index, shards
  EXPECT_TRUE(fs::exists(dir.path() + "/one/model.safetensors.index.json"));
  for (const std::string& n : names) {
    const std::string x = read_bytes(dir.path() + "/one/" + n);
    EXPECT_FALSE(x.empty()) << n;
    EXPECT_TRUE(x == read_bytes(dir.path() + "/many/" + n)) << n << " differs";
  }
  // A different seed gives different weights (the comparison above can fail).
  make_model(dir.path() + "/seed6", c, 6, shard, false, {2, 1 << 16});
  const std::string first_shard = WeightStore(dir.path() + "/one").files()[0];
  EXPECT_FALSE(read_bytes(dir.path() + "/one/" + first_shard) ==
               read_bytes(dir.path() + "/seed6/" + first_shard));

  const std::string e = error_of([&] {
    make_model(dir.path() + "/odd", c, 5, shard, false, {1, 4097});
  });
  EXPECT_NE(e.find("piece_bytes 4097"), std::string::npos) << e;
  EXPECT_FALSE(fs::exists(dir.path() + "/odd/config.json"));
}

}  // namespace
}  // namespace fp8kv
