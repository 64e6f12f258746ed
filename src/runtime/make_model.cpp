#include "fp8kv/make_model.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <thread>
#include <nlohmann/json.hpp>

#include "fp8kv/error.h"
#include "fp8kv/fp8.h"
#include "fp8kv/progress.h"
#include "fp8kv/safetensors.h"

namespace fp8kv {

namespace fs = std::filesystem;

namespace {

uint64_t mix(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t hash_name(const std::string& s, uint64_t seed) {
  uint64_t h = 1469598103934665603ull ^ mix(seed);
  for (unsigned char ch : s) h = (h ^ ch) * 1099511628211ull;
  return mix(h);
}

// How one tensor is filled: uniform in [center - a, center + a] with a = std * sqrt(3).
struct Init {
  float center = 0.0f;
  float std = 0.0f;
};

// Row scaling for K outliers: k_proj rows of the outlier channels.
struct RowScale {
  int64_t row;
  float factor;
};

}  // namespace

std::vector<std::string> model_preset_names() {
  return {"tiny", "tiny-mqa", "qwen2-tiny", "llama-8b-4layers", "llama-3-8b", "qwen2.5-7b"};
}

namespace {

// Llama 3.1's RMSNorm eps and RoPE (theta 500000, llama3 scaling from 8192 positions); the shapes
// are the caller's.
ModelConfig llama3_shaped(int hidden, int intermediate, int layers, int q_heads, int kv_heads,
                          int head_dim, int vocab) {
  ModelConfig c;
  c.architecture = "LlamaForCausalLM";
  c.hidden_size = hidden;
  c.intermediate_size = intermediate;
  c.num_layers = layers;
  c.num_q_heads = q_heads;
  c.num_kv_heads = kv_heads;
  c.head_dim = head_dim;
  c.vocab_size = vocab;
  c.rms_norm_eps = 1e-5f;
  c.rope_theta = 500000.0f;
  c.rope_scaling.type = RopeScaling::Type::kLlama3;
  c.rope_scaling.factor = 8.0f;
  c.rope_scaling.low_freq_factor = 1.0f;
  c.rope_scaling.high_freq_factor = 4.0f;
  c.rope_scaling.original_max_position_embeddings = 8192;
  c.max_position_embeddings = 131072;
  return c;
}

// Qwen2's shape: q/k/v biases, RoPE theta 1e6, no RoPE scaling.
ModelConfig qwen2_shaped(int hidden, int intermediate, int layers, int q_heads, int kv_heads,
                         int head_dim, int vocab, bool tied_embeddings) {
  ModelConfig c;
  c.architecture = "Qwen2ForCausalLM";
  c.hidden_size = hidden;
  c.intermediate_size = intermediate;
  c.num_layers = layers;
  c.num_q_heads = q_heads;
  c.num_kv_heads = kv_heads;
  c.head_dim = head_dim;
  c.vocab_size = vocab;
  c.rms_norm_eps = 1e-6f;
  c.rope_theta = 1000000.0f;
  c.max_position_embeddings = 32768;
  c.tie_word_embeddings = tied_embeddings;
  c.attention_bias = true;
  return c;
}

}  // namespace

ModelConfig model_preset(const std::string& name) {
  if (name == "tiny") return llama3_shaped(512, 1024, 4, 8, 2, 64, 2048);
  if (name == "tiny-mqa") return llama3_shaped(512, 1024, 4, 8, 1, 64, 2048);
  if (name == "llama-8b-4layers") return llama3_shaped(4096, 14336, 4, 32, 8, 128, 128256);
  if (name == "llama-3-8b") return llama3_shaped(4096, 14336, 32, 32, 8, 128, 128256);
  if (name == "qwen2.5-7b") return qwen2_shaped(3584, 18944, 28, 28, 4, 128, 152064, false);
  if (name == "qwen2-tiny") return qwen2_shaped(512, 1024, 2, 8, 4, 64, 2048, true);
  std::string names;
  for (const auto& n : model_preset_names()) names += (names.empty() ? "" : ", ") + n;
  throw Error("unknown model preset '" + name + "' (presets: " + names + ")");
}

void make_model(const std::string& dir, const ModelConfig& c, uint64_t seed, uint64_t shard_bytes,
                bool show_progress, const ModelWriter& writer) {
  if (writer.piece_bytes == 0 || writer.piece_bytes % 2 != 0) {
    throw Error("make_model: piece_bytes " + std::to_string(writer.piece_bytes) +
                " is not a positive even number (whole bf16 elements)");
  }
  if (writer.threads < 0) {
    throw Error("make_model: threads " + std::to_string(writer.threads) + " is negative");
  }
  fs::create_directories(dir);
  const int64_t H = c.hidden_size, I = c.intermediate_size, V = c.vocab_size;
  const int64_t QD = static_cast<int64_t>(c.num_q_heads) * c.head_dim;
  const int64_t KD = static_cast<int64_t>(c.num_kv_heads) * c.head_dim;
  const int D = c.head_dim;

  std::vector<TensorSpec> specs;
  std::vector<Init> inits;
  std::vector<std::vector<RowScale>> row_scales;
  auto add = [&](const std::string& name, std::vector<int64_t> shape, Init init,
                 std::vector<RowScale> rows = {}) {
    specs.push_back({name, DType::kBF16, std::move(shape)});
    inits.push_back(init);
    row_scales.push_back(std::move(rows));
  };
  auto fan_in = [](int64_t n) { return Init{0.0f, static_cast<float>(1.0 / std::sqrt(n))}; };
  // Logits with a std of about 2.5 give peaked next-token distributions, as trained models do.
  const Init head_init{0.0f, static_cast<float>(2.5 / std::sqrt(H))};
  const Init norm_init{1.0f, 0.05f};

  add("model.embed_tokens.weight", {V, H}, c.tie_word_embeddings ? head_init : Init{0.0f, 1.0f});
  for (int l = 0; l < c.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    // K outliers: one KV head per layer carries a strong channel (x16), another a weaker one
    // (x8). Both halves of a RoPE pair are scaled, since RoPE mixes them.
    std::vector<RowScale> k_rows;
    const int strong_head = l % c.num_kv_heads;
    const int weak_head = (l + 1) % c.num_kv_heads;
    const int ch = (7 * l + 3) % (D / 2);
    for (int half : {0, D / 2}) {
      k_rows.push_back({static_cast<int64_t>(strong_head) * D + ch + half, 16.0f});
      if (weak_head != strong_head) {
        k_rows.push_back({static_cast<int64_t>(weak_head) * D + (ch + 5) % (D / 2) + half, 8.0f});
      }
    }
    add(p + "input_layernorm.weight", {H}, norm_init);
    add(p + "self_attn.q_proj.weight", {QD, H}, fan_in(H));
    add(p + "self_attn.k_proj.weight", {KD, H}, fan_in(H), k_rows);
    add(p + "self_attn.v_proj.weight", {KD, H}, fan_in(H));
    if (c.attention_bias) {
      add(p + "self_attn.q_proj.bias", {QD}, Init{0.0f, 0.1f});
      // Qwen2-style large K biases on the outlier channels.
      std::vector<RowScale> kb = k_rows;
      for (auto& r : kb) r.factor *= 2.0f;
      add(p + "self_attn.k_proj.bias", {KD}, Init{0.0f, 0.1f}, kb);
      add(p + "self_attn.v_proj.bias", {KD}, Init{0.0f, 0.1f});
    }
    add(p + "self_attn.o_proj.weight", {H, QD}, fan_in(QD));
    add(p + "post_attention_layernorm.weight", {H}, norm_init);
    add(p + "mlp.gate_proj.weight", {I, H}, fan_in(H));
    add(p + "mlp.up_proj.weight", {I, H}, fan_in(H));
    add(p + "mlp.down_proj.weight", {H, I}, fan_in(I));
  }
  add("model.norm.weight", {H}, norm_init);
  if (!c.tie_word_embeddings) add("lm_head.weight", {V, H}, head_init);

  {
    const std::string cfg = (fs::path(dir) / "config.json").string();
    std::ofstream out(cfg, std::ios::trunc);
    if (!out) throw Error(cfg + ": cannot create");
    out << model_config_to_json(c);
    if (!out) throw Error(cfg + ": write failed");
  }

  // Each tensor in chunks of kChunk elements with their own random stream, so that the bytes
  // depend neither on the number of threads nor on how the writer cuts the tensor into pieces
  // (a piece starting inside a chunk steps the chunk's stream up to its first element).
  constexpr int64_t kChunk = 1 << 16;
  auto fill_range = [&](size_t i, uint64_t offset, uint8_t* dst, size_t bytes) {
    const int64_t e0 = static_cast<int64_t>(offset / 2);
    const int64_t e1 = e0 + static_cast<int64_t>(bytes / 2);
    const int64_t cols = specs[i].shape.size() == 2 ? specs[i].shape[1] : 1;
    const uint64_t base = hash_name(specs[i].name, seed);
    const float a = inits[i].std * std::sqrt(3.0f);
    const float center = inits[i].center;
    for (int64_t ck = e0 / kChunk; ck * kChunk < e1; ++ck) {
      uint64_t state = mix(base ^ mix(static_cast<uint64_t>(ck)));
      const int64_t end = std::min(e1, (ck + 1) * kChunk);
      for (int64_t e = ck * kChunk; e < end; ++e) {
        state = mix(state);
        if (e < e0) continue;
        const float u = static_cast<float>(state >> 40) * (1.0f / 16777216.0f);  // [0, 1)
        const uint16_t b = float_to_bf16(center + a * (2.0f * u - 1.0f));
        std::memcpy(dst + 2 * (e - e0), &b, 2);
      }
    }
    for (const RowScale& rs : row_scales[i]) {
      for (int64_t e = std::max(e0, rs.row * cols); e < std::min(e1, (rs.row + 1) * cols); ++e) {
        uint16_t b;
        std::memcpy(&b, dst + 2 * (e - e0), 2);
        b = float_to_bf16(bf16_to_float(b) * rs.factor);
        std::memcpy(dst + 2 * (e - e0), &b, 2);
      }
    }
  };

  // Shards of at most shard_bytes (a tensor larger than that gets a shard of its own).
  std::vector<std::vector<size_t>> shards(1);
  uint64_t in_shard = 0, total = 0;
  for (size_t i = 0; i < specs.size(); ++i) {
    uint64_t bytes = 2;
    for (int64_t d : specs[i].shape) bytes *= static_cast<uint64_t>(d);
    if (!shards.back().empty() && in_shard + bytes > shard_bytes) {
      shards.emplace_back();
      in_shard = 0;
    }
    shards.back().push_back(i);
    in_shard += bytes;
    total += bytes;
  }
  // Stale weights of an earlier make-model in the same folder would confuse the loader.
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string f = e.path().filename().string();
    if (e.path().extension() == ".safetensors" || f == "model.safetensors.index.json") {
      fs::remove(e.path());
    }
  }
  nlohmann::json index = {{"metadata", {{"total_size", total}}},
                          {"weight_map", nlohmann::json::object()}};
  std::vector<SafetensorsFileSpec> files;
  for (size_t s = 0; s < shards.size(); ++s) {
    char name[64];
    std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", s + 1, shards.size());
    const std::string file = shards.size() == 1 ? "model.safetensors" : name;
    SafetensorsFileSpec spec{(fs::path(dir) / file).string(), {}};
    for (size_t i : shards[s]) {
      spec.tensors.push_back(specs[i]);
      index["weight_map"][specs[i].name] = file;
    }
    files.push_back(std::move(spec));
  }
  // Progress in pieces written, from whichever worker finishes one.
  int64_t pieces = 0;
  for (const TensorSpec& t : specs) {
    pieces += static_cast<int64_t>(
        (2 * TensorInfo{t.name, t.dtype, t.shape}.numel() + writer.piece_bytes - 1) /
        writer.piece_bytes);
  }
  Progress progress("writing " + dir, pieces, show_progress);
  std::mutex progress_mu;
  int64_t written = 0;
  const unsigned hw = std::thread::hardware_concurrency();
  write_safetensors_files(
      files,
      [&](size_t f, size_t t, uint64_t offset, uint8_t* dst, size_t bytes) {
        fill_range(shards[f][t], offset, dst, bytes);
        std::lock_guard<std::mutex> lock(progress_mu);
        progress.update(++written);
      },
      writer.piece_bytes,
      writer.threads > 0 ? writer.threads : static_cast<int>(std::max(1u, std::min(hw, 32u))));
  if (shards.size() > 1) {
    const std::string index_path = (fs::path(dir) / "model.safetensors.index.json").string();
    const std::string tmp = index_path + ".tmp";
    {
      std::ofstream out(tmp, std::ios::trunc);
      out << index.dump(2) << "\n";
      if (!out) throw Error(tmp + ": write failed");
    }
    fs::rename(tmp, index_path);
  }
}

}  // namespace fp8kv
