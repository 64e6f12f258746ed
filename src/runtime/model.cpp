// Model weights: config.json + safetensors into fp32 or bf16 backend buffers; the device
// choice (backend + model ops + weight dtype) of the CLI.
#include "fp8kv/model.h"

#include <algorithm>
#include <string>
#include <vector>

#include "fp8kv/error.h"
#include "fp8kv/fp8.h"
#include "fp8kv/progress.h"
#include "fp8kv/safetensors.h"

#if defined(FP8KV_HAVE_CUDA)
#include <cuda_runtime.h>
#endif

namespace fp8kv {

namespace {

BackendBuffer upload_floats(Backend& backend, const std::vector<float>& v) {
  BackendBuffer b(backend, v.size() * sizeof(float));
  b.upload(v.data(), v.size() * sizeof(float));
  return b;
}

// A weight matrix as `dtype`: fp32 as is, or rounded to bf16 (exact for bf16 checkpoints).
BackendBuffer upload_matrix(Backend& backend, const std::vector<float>& v, WeightDtype dtype) {
  if (dtype == WeightDtype::kF32) return upload_floats(backend, v);
  std::vector<uint16_t> h(v.size());
  const int64_t n = static_cast<int64_t>(v.size());
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    h[static_cast<size_t>(i)] = float_to_bf16(v[static_cast<size_t>(i)]);
  }
  BackendBuffer b(backend, h.size() * sizeof(uint16_t));
  b.upload(h.data(), h.size() * sizeof(uint16_t));
  return b;
}

// Rows of `a` then rows of `b` (two [rows, cols] tensors stacked along the output dimension).
std::vector<float> concat(std::vector<float> a, const std::vector<float>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// Rows [begin, begin + count) of a [*, cols] row-major matrix (or vector, cols = 1).
std::vector<float> slice_rows(const std::vector<float>& v, int64_t cols, int64_t begin,
                              int64_t count) {
  return std::vector<float>(v.begin() + begin * cols, v.begin() + (begin + count) * cols);
}

// Columns [begin, begin + count) of a [rows, cols] row-major matrix: [rows, count].
std::vector<float> slice_cols(const std::vector<float>& v, int64_t rows, int64_t cols,
                              int64_t begin, int64_t count) {
  std::vector<float> out(static_cast<size_t>(rows * count));
  for (int64_t r = 0; r < rows; ++r) {
    std::copy(v.begin() + r * cols + begin, v.begin() + r * cols + begin + count,
              out.begin() + r * count);
  }
  return out;
}

}  // namespace

TpShard make_tp_shard(const ModelConfig& c, int tp, int rank) {
  const std::string what = "tensor parallelism --tp " + std::to_string(tp) + ": ";
  if (tp < 1 || rank < 0 || rank >= tp) {
    throw Error(what + "rank " + std::to_string(rank) + " is not in [0, tp)");
  }
  if (c.num_q_heads % tp != 0) {
    throw Error(what + "tp must divide the " + std::to_string(c.num_q_heads) +
                " attention (Q) heads");
  }
  if (c.num_kv_heads % tp != 0 && tp % c.num_kv_heads != 0) {
    throw Error(what + "tp must divide the " + std::to_string(c.num_kv_heads) +
                " KV heads, or be a multiple of them");
  }
  if (c.intermediate_size % tp != 0) {
    throw Error(what + "tp must divide intermediate_size " + std::to_string(c.intermediate_size));
  }
  TpShard s;
  s.tp = tp;
  s.rank = rank;
  s.q_heads = c.num_q_heads / tp;
  s.q_head_begin = rank * s.q_heads;
  s.kv_heads = std::max(1, c.num_kv_heads / tp);
  const int f = tp * s.kv_heads / c.num_kv_heads;  // ranks sharing each KV head
  s.kv_head_begin = rank * s.kv_heads / f;
  s.inter = c.intermediate_size / tp;
  s.inter_begin = rank * s.inter;
  return s;
}

const char* weight_dtype_name(WeightDtype t) { return t == WeightDtype::kBf16 ? "bf16" : "fp32"; }

Device make_device(const std::string& name) {
  Device d;
  if (name == "cpu") {
    d.backend = make_cpu_backend();
    d.ops = make_cpu_model_ops();
    d.weights = WeightDtype::kF32;
    return d;
  }
  if (name == "cuda") {
#if defined(FP8KV_HAVE_CUDA)
    if (!cuda_available()) {
      throw Error("--device cuda: no usable GPU here (fp8kv's kernels need a Hopper GPU, sm_90, "
                  "and a CUDA driver); use --device cpu");
    }
    // The calling thread's current GPU (0 unless someone chose another): a --tp rank process
    // selects GPU `rank` (make_nccl_communicator) before it makes its Device.
    int current = 0;
    if (cudaGetDevice(&current) != cudaSuccess) {
      cudaGetLastError();
      current = 0;
    }
    d.backend = make_cuda_backend(current, nullptr);
    d.ops = make_cuda_model_ops(*d.backend, nullptr);
    d.weights = WeightDtype::kBf16;
    return d;
#else
    throw Error(
        "--device cuda: this fp8kv build has no CUDA backend (it was built without nvcc); "
        "rebuild with CUDA (FP8KV_CUDA=AUTO or ON) or use --device cpu");
#endif
  }
  throw Error("--device '" + name + "': expected cpu or cuda");
}

size_t Model::weight_bytes() const {
  size_t b = embed_.bytes() + final_norm_.bytes() + lm_head_.bytes() + inv_freq_.bytes();
  for (const LayerWeights& w : layers_) {
    for (const BackendBuffer* x : {&w.attn_norm, &w.w_q, &w.b_q, &w.w_kv, &w.b_kv, &w.w_o,
                                   &w.mlp_norm, &w.w_gate_up, &w.w_down}) {
      b += x->bytes();
    }
  }
  return b;
}

std::unique_ptr<Model> Model::load(const std::string& dir, Backend& backend, bool show_progress,
                                   WeightDtype weights, int tp, int rank) {
  auto m = std::unique_ptr<Model>(new Model());
  m->dir_ = dir;
  m->weights_ = weights;
  m->config_ = load_model_config(dir);
  const ModelConfig& c = m->config_;
  m->shard_ = make_tp_shard(c, tp, rank);
  const TpShard& sh = m->shard_;
  WeightStore store(dir);
  const int64_t H = c.hidden_size, I = c.intermediate_size, V = c.vocab_size, D = c.head_dim;
  const int64_t QD = static_cast<int64_t>(c.num_q_heads) * D;
  const int64_t KD = static_cast<int64_t>(c.num_kv_heads) * D;
  // The rank's slices (the whole tensors when tp = 1): rows of q/k/v_proj and gate/up_proj
  // (outputs), columns of o_proj and down_proj (inputs).
  const int64_t q0 = sh.q_head_begin * D, q_len = sh.q_heads * D;
  const int64_t k0 = sh.kv_head_begin * D, k_len = sh.kv_heads * D;
  const int64_t i0 = sh.inter_begin, i_len = sh.inter;
  auto read_rows = [&](const std::string& name, std::vector<int64_t> shape, int64_t begin,
                       int64_t count) {
    const int64_t cols = shape.size() > 1 ? shape[1] : 1;
    return slice_rows(store.read_f32(name, shape), cols, begin, count);
  };
  auto read_cols = [&](const std::string& name, int64_t r, int64_t cl, int64_t begin,
                       int64_t count) {
    return slice_cols(store.read_f32(name, {r, cl}), r, cl, begin, count);
  };

  Progress progress("loading " + dir, c.num_layers + 2, show_progress);
  const WeightDtype wd = weights;
  m->embed_ = upload_matrix(backend, store.read_f32("model.embed_tokens.weight", {V, H}), wd);
  progress.update(1);
  for (int l = 0; l < c.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    LayerWeights w;
    w.dtype = wd;
    w.attn_norm = upload_floats(backend, store.read_f32(p + "input_layernorm.weight", {H}));
    w.w_q =
        upload_matrix(backend, read_rows(p + "self_attn.q_proj.weight", {QD, H}, q0, q_len), wd);
    w.w_kv = upload_matrix(backend,
                           concat(read_rows(p + "self_attn.k_proj.weight", {KD, H}, k0, k_len),
                                  read_rows(p + "self_attn.v_proj.weight", {KD, H}, k0, k_len)),
                           wd);
    if (c.attention_bias) {
      w.b_q = upload_floats(backend, read_rows(p + "self_attn.q_proj.bias", {QD}, q0, q_len));
      w.b_kv =
          upload_floats(backend, concat(read_rows(p + "self_attn.k_proj.bias", {KD}, k0, k_len),
                                        read_rows(p + "self_attn.v_proj.bias", {KD}, k0, k_len)));
    }
    w.w_o = upload_matrix(backend, read_cols(p + "self_attn.o_proj.weight", H, QD, q0, q_len), wd);
    w.mlp_norm = upload_floats(backend, store.read_f32(p + "post_attention_layernorm.weight", {H}));
    w.w_gate_up = upload_matrix(backend,
                                concat(read_rows(p + "mlp.gate_proj.weight", {I, H}, i0, i_len),
                                       read_rows(p + "mlp.up_proj.weight", {I, H}, i0, i_len)),
                                wd);
    w.w_down = upload_matrix(backend, read_cols(p + "mlp.down_proj.weight", H, I, i0, i_len), wd);
    m->layers_.push_back(std::move(w));
    progress.update(l + 2);
  }
  m->final_norm_ = upload_floats(backend, store.read_f32("model.norm.weight", {H}));
  if (!c.tie_word_embeddings) {
    m->lm_head_ = upload_matrix(backend, store.read_f32("lm_head.weight", {V, H}), wd);
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
                                 KvScheme scheme, const TpShard& shard) {
  if (!is_fp8(scheme)) {
    throw Error(std::string("the ") + scheme_name(scheme) + " KV cache takes no calibration file");
  }
  return slice_for_rank(load_calib(calib_path, calib_expect_for(config, scheme)), shard.tp,
                        shard.rank);
}

}  // namespace fp8kv
