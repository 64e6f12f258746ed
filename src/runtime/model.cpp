// Model weights: config.json + safetensors into fp32 backend buffers.
#include "fp8kv/model.h"

#include <string>
#include <vector>

#include "fp8kv/error.h"
#include "fp8kv/progress.h"
#include "fp8kv/safetensors.h"

namespace fp8kv {

namespace {

BackendBuffer upload_floats(Backend& backend, const std::vector<float>& v) {
  BackendBuffer b(backend, v.size() * sizeof(float));
  b.upload(v.data(), v.size() * sizeof(float));
  return b;
}

// Rows of `a` then rows of `b` (two [rows, cols] tensors stacked along the output dimension).
std::vector<float> concat(std::vector<float> a, const std::vector<float>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

}  // namespace

std::unique_ptr<Model> Model::load(const std::string& dir, Backend& backend, bool show_progress) {
  auto m = std::unique_ptr<Model>(new Model());
  m->dir_ = dir;
  m->config_ = load_model_config(dir);
  const ModelConfig& c = m->config_;
  WeightStore store(dir);
  const int64_t H = c.hidden_size, I = c.intermediate_size, V = c.vocab_size;
  const int64_t QD = static_cast<int64_t>(c.num_q_heads) * c.head_dim;
  const int64_t KD = static_cast<int64_t>(c.num_kv_heads) * c.head_dim;

  Progress progress("loading " + dir, c.num_layers + 2, show_progress);
  m->embed_ = upload_floats(backend, store.read_f32("model.embed_tokens.weight", {V, H}));
  progress.update(1);
  for (int l = 0; l < c.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    LayerWeights w;
    w.attn_norm = upload_floats(backend, store.read_f32(p + "input_layernorm.weight", {H}));
    w.w_q = upload_floats(backend, store.read_f32(p + "self_attn.q_proj.weight", {QD, H}));
    w.w_kv = upload_floats(backend, concat(store.read_f32(p + "self_attn.k_proj.weight", {KD, H}),
                                           store.read_f32(p + "self_attn.v_proj.weight", {KD, H})));
    if (c.attention_bias) {
      w.b_q = upload_floats(backend, store.read_f32(p + "self_attn.q_proj.bias", {QD}));
      w.b_kv = upload_floats(backend, concat(store.read_f32(p + "self_attn.k_proj.bias", {KD}),
                                             store.read_f32(p + "self_attn.v_proj.bias", {KD})));
    }
    w.w_o = upload_floats(backend, store.read_f32(p + "self_attn.o_proj.weight", {H, QD}));
    w.mlp_norm = upload_floats(backend, store.read_f32(p + "post_attention_layernorm.weight", {H}));
    w.w_gate_up = upload_floats(backend, concat(store.read_f32(p + "mlp.gate_proj.weight", {I, H}),
                                                store.read_f32(p + "mlp.up_proj.weight", {I, H})));
    w.w_down = upload_floats(backend, store.read_f32(p + "mlp.down_proj.weight", {H, I}));
    m->layers_.push_back(std::move(w));
    progress.update(l + 2);
  }
  m->final_norm_ = upload_floats(backend, store.read_f32("model.norm.weight", {H}));
  if (!c.tie_word_embeddings) {
    m->lm_head_ = upload_floats(backend, store.read_f32("lm_head.weight", {V, H}));
  }
  m->inv_freq_ = upload_floats(backend, rope_inv_freq(c));
  progress.update(c.num_layers + 2);
  return m;
}

CalibExpect calib_expect_for(const ModelConfig& config, KvScheme scheme) {
  CalibExpect e;
  e.architectures = config.architecture;
  e.num_layers = config.num_layers;
  e.num_kv_heads = config.num_kv_heads;
  if (scheme == KvScheme::kFp8PerHead) e.quant_type = QuantType::kPerHead;
  if (scheme == KvScheme::kFp8PerTensor) e.quant_type = QuantType::kPerTensor;
  return e;
}

RankScales load_scales_for_model(const std::string& calib_path, const ModelConfig& config,
                                 KvScheme scheme) {
  if (!is_fp8(scheme)) {
    throw Error(std::string("the ") + scheme_name(scheme) + " KV cache takes no calibration file");
  }
  return slice_for_rank(load_calib(calib_path, calib_expect_for(config, scheme)), 1, 0);
}

}  // namespace fp8kv
