// config.json of a Hugging Face model folder, for the Llama and Qwen2 families.
#pragma once

#include <string>
#include <vector>

#include "fp8kv/export.h"

namespace fp8kv {

// rope_scaling: none, or Llama 3.1's "llama3" frequency-dependent scaling.
struct RopeScaling {
  enum class Type { kNone, kLlama3 };
  Type type = Type::kNone;
  float factor = 1.0f;
  float low_freq_factor = 1.0f;
  float high_freq_factor = 4.0f;
  int original_max_position_embeddings = 8192;
};

struct ModelConfig {
  std::string architecture;   // architectures[0], e.g. "LlamaForCausalLM"
  int hidden_size = 0;        // H
  int intermediate_size = 0;  // I
  int num_layers = 0;         // num_hidden_layers
  int num_q_heads = 0;        // num_attention_heads (Hq)
  int num_kv_heads = 0;       // num_key_value_heads (Hkv), divides Hq
  int head_dim = 0;           // D: head_dim when given, else H / Hq
  int vocab_size = 0;         // V
  float rms_norm_eps = 1e-6f;
  float rope_theta = 10000.0f;
  RopeScaling rope_scaling;
  int max_position_embeddings = 4096;
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // q/k/v projections carry a bias (Qwen2: always)
};

// Parses config.json text; `name` stands for the file in messages. Throws Error naming the file
// and the field on a missing or mistyped field, an unsupported architecture or rope scaling, or
// inconsistent sizes (heads not dividing, head_dim missing and H not divisible by Hq).
FP8KV_API ModelConfig parse_model_config(const std::string& text, const std::string& name);
// Reads DIR/config.json.
FP8KV_API ModelConfig load_model_config(const std::string& model_dir);
// config.json text for `c` (what make-model writes).
FP8KV_API std::string model_config_to_json(const ModelConfig& c);

// RoPE inverse frequencies, [D / 2]: theta^(-2i/D), with llama3 scaling applied when set.
FP8KV_API std::vector<float> rope_inv_freq(const ModelConfig& c);

}  // namespace fp8kv
