#include "fp8kv/model_config.h"

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "fp8kv/error.h"

namespace fp8kv {

using json = nlohmann::json;

namespace {

const char* const kSupported[] = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"};

int get_int(const json& j, const std::string& name, const char* field, bool required, int def) {
  if (!j.contains(field) || j[field].is_null()) {
    if (required) throw Error(name + ": missing field '" + field + "'");
    return def;
  }
  const json& v = j[field];
  if (!v.is_number_integer()) {
    throw Error(name + ": field '" + field + "' must be an integer, found " + v.dump());
  }
  const int64_t x = v.get<int64_t>();
  if (x <= 0 || x > (1ll << 30)) {
    throw Error(name + ": field '" + field + "' must be a positive integer, found " + v.dump());
  }
  return static_cast<int>(x);
}

float get_float(const json& j, const std::string& name, const char* field, float def) {
  if (!j.contains(field) || j[field].is_null()) return def;
  const json& v = j[field];
  if (!v.is_number()) {
    throw Error(name + ": field '" + field + "' must be a number, found " + v.dump());
  }
  const double x = v.get<double>();
  if (!std::isfinite(x) || x <= 0) {
    throw Error(name + ": field '" + field + "' must be a positive number, found " + v.dump());
  }
  return static_cast<float>(x);
}

bool get_bool(const json& j, const std::string& name, const char* field, bool def) {
  if (!j.contains(field) || j[field].is_null()) return def;
  if (!j[field].is_boolean()) {
    throw Error(name + ": field '" + field + "' must be true or false, found " + j[field].dump());
  }
  return j[field].get<bool>();
}

}  // namespace

ModelConfig parse_model_config(const std::string& text, const std::string& name) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    throw Error(name + ": not valid JSON: " + e.what());
  }
  if (!j.is_object()) throw Error(name + ": not a JSON object");
  ModelConfig c;
  if (!j.contains("architectures") || !j["architectures"].is_array() ||
      j["architectures"].empty() || !j["architectures"][0].is_string()) {
    throw Error(name + ": missing field 'architectures' (an array of names)");
  }
  c.architecture = j["architectures"][0].get<std::string>();
  bool known = false;
  for (const char* a : kSupported) known = known || c.architecture == a;
  if (!known) {
    throw Error(name + ": architecture '" + c.architecture +
                "' is not supported (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)");
  }
  const bool qwen2 = c.architecture == "Qwen2ForCausalLM";
  c.hidden_size = get_int(j, name, "hidden_size", true, 0);
  c.intermediate_size = get_int(j, name, "intermediate_size", true, 0);
  c.num_layers = get_int(j, name, "num_hidden_layers", true, 0);
  c.num_q_heads = get_int(j, name, "num_attention_heads", true, 0);
  c.num_kv_heads = get_int(j, name, "num_key_value_heads", false, c.num_q_heads);
  c.vocab_size = get_int(j, name, "vocab_size", true, 0);
  c.max_position_embeddings = get_int(j, name, "max_position_embeddings", false, 4096);
  if (j.contains("head_dim") && !j["head_dim"].is_null()) {
    c.head_dim = get_int(j, name, "head_dim", true, 0);
  } else {
    if (c.hidden_size % c.num_q_heads != 0) {
      throw Error(name + ": no 'head_dim', and hidden_size " + std::to_string(c.hidden_size) +
                  " is not divisible by num_attention_heads " + std::to_string(c.num_q_heads));
    }
    c.head_dim = c.hidden_size / c.num_q_heads;
  }
  if (c.num_q_heads % c.num_kv_heads != 0) {
    throw Error(name + ": num_attention_heads " + std::to_string(c.num_q_heads) +
                " is not a multiple of num_key_value_heads " + std::to_string(c.num_kv_heads));
  }
  if (c.head_dim % 2 != 0) {
    throw Error(name + ": head_dim " + std::to_string(c.head_dim) + " must be even for RoPE");
  }
  c.rms_norm_eps = get_float(j, name, "rms_norm_eps", 1e-6f);
  c.rope_theta = get_float(j, name, "rope_theta", 10000.0f);
  // transformers v5 writes the RoPE settings as one object, rope_parameters, holding
  // rope_theta and the rope_scaling fields; older configs have them at the top level.
  const bool v5_rope = j.contains("rope_parameters") && j["rope_parameters"].is_object();
  if (v5_rope && !j.contains("rope_theta")) {
    c.rope_theta =
        get_float(j["rope_parameters"], name + " rope_parameters", "rope_theta", 10000.0f);
  }
  c.tie_word_embeddings = get_bool(j, name, "tie_word_embeddings", false);
  // Qwen2's attention always has q/k/v biases (its config has no switch for it).
  c.attention_bias = get_bool(j, name, "attention_bias", qwen2);

  const bool has_scaling = j.contains("rope_scaling") && !j["rope_scaling"].is_null();
  if (has_scaling || v5_rope) {
    const json& r = has_scaling ? j["rope_scaling"] : j["rope_parameters"];
    if (!r.is_object()) throw Error(name + ": field 'rope_scaling' must be an object or null");
    std::string type;
    if (r.contains("rope_type") && r["rope_type"].is_string()) {
      type = r["rope_type"].get<std::string>();
    } else if (r.contains("type") && r["type"].is_string()) {
      type = r["type"].get<std::string>();
    } else {
      throw Error(name + ": rope_scaling has no 'rope_type'");
    }
    if (type == "llama3") {
      const std::string where = name + " rope_scaling";
      c.rope_scaling.type = RopeScaling::Type::kLlama3;
      c.rope_scaling.factor = get_float(r, where, "factor", 0.0f);
      c.rope_scaling.low_freq_factor = get_float(r, where, "low_freq_factor", 0.0f);
      c.rope_scaling.high_freq_factor = get_float(r, where, "high_freq_factor", 0.0f);
      c.rope_scaling.original_max_position_embeddings =
          get_int(r, where, "original_max_position_embeddings", true, 0);
      for (const char* f : {"factor", "low_freq_factor", "high_freq_factor"}) {
        if (!r.contains(f)) throw Error(where + ": missing field '" + f + "'");
      }
      if (c.rope_scaling.high_freq_factor <= c.rope_scaling.low_freq_factor) {
        throw Error(
            where + ": high_freq_factor " + std::to_string(c.rope_scaling.high_freq_factor) +
            " must exceed low_freq_factor " + std::to_string(c.rope_scaling.low_freq_factor));
      }
    } else if (type != "default") {
      throw Error(name + ": rope_scaling type '" + type +
                  "' is not supported (null, \"default\" or \"llama3\")");
    }
  }
  return c;
}

ModelConfig load_model_config(const std::string& model_dir) {
  const std::string path = model_dir + "/config.json";
  std::ifstream in(path);
  if (!in) throw Error(path + ": cannot open (is " + model_dir + " a model folder?)");
  std::stringstream ss;
  ss << in.rdbuf();
  return parse_model_config(ss.str(), path);
}

std::string model_config_to_json(const ModelConfig& c) {
  const bool qwen2 = c.architecture == "Qwen2ForCausalLM";
  json j = {
      {"architectures", {c.architecture}},
      {"model_type", qwen2 ? "qwen2" : "llama"},
      {"hidden_size", c.hidden_size},
      {"intermediate_size", c.intermediate_size},
      {"num_hidden_layers", c.num_layers},
      {"num_attention_heads", c.num_q_heads},
      {"num_key_value_heads", c.num_kv_heads},
      {"head_dim", c.head_dim},
      {"vocab_size", c.vocab_size},
      {"rms_norm_eps", c.rms_norm_eps},
      {"rope_theta", c.rope_theta},
      {"max_position_embeddings", c.max_position_embeddings},
      {"tie_word_embeddings", c.tie_word_embeddings},
      {"hidden_act", "silu"},
      {"torch_dtype", "bfloat16"},
  };
  if (!qwen2) j["attention_bias"] = c.attention_bias;
  if (c.rope_scaling.type == RopeScaling::Type::kLlama3) {
    j["rope_scaling"] = {
        {"rope_type", "llama3"},
        {"factor", c.rope_scaling.factor},
        {"low_freq_factor", c.rope_scaling.low_freq_factor},
        {"high_freq_factor", c.rope_scaling.high_freq_factor},
        {"original_max_position_embeddings", c.rope_scaling.original_max_position_embeddings}};
  } else {
    j["rope_scaling"] = nullptr;
  }
  return j.dump(2) + "\n";
}

std::vector<float> rope_inv_freq(const ModelConfig& c) {
  const int half = c.head_dim / 2;
  std::vector<float> inv(static_cast<size_t>(half));
  const double kPi = 3.14159265358979323846;
  const RopeScaling& s = c.rope_scaling;
  for (int i = 0; i < half; ++i) {
    double f = std::pow(static_cast<double>(c.rope_theta), -2.0 * i / c.head_dim);
    if (s.type == RopeScaling::Type::kLlama3) {
      // Llama 3.1: long wavelengths are slowed down by `factor`, short ones kept, and the band
      // between is interpolated smoothly.
      const double orig = s.original_max_position_embeddings;
      const double low_freq_wavelen = orig / s.low_freq_factor;
      const double high_freq_wavelen = orig / s.high_freq_factor;
      const double wavelen = 2.0 * kPi / f;
      if (wavelen > low_freq_wavelen) {
        f = f / s.factor;
      } else if (wavelen >= high_freq_wavelen) {
        const double smooth =
            (orig / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        f = (1.0 - smooth) * f / s.factor + smooth * f;
      }
    }
    inv[static_cast<size_t>(i)] = static_cast<float>(f);
  }
  return inv;
}

}  // namespace fp8kv
