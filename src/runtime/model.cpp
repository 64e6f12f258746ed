// Model weights: config.json + safetensors into fp32 or bf16 backend buffers; the device
// choice (backend + model ops + weight dtype) of the CLI.
#include "fp8kv/model.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <set>
#include <string>
#include <vector>

#include "fp8kv/error.h"
#include "fp8kv/fp8.h"
#include "fp8kv/safetensors.h"
#include "fp8kv/scale_tensors.h"

#if defined(FP8KV_HAVE_CUDA)
#include <cuda_runtime.h>
#endif

namespace fp8kv {

namespace {

// The weights of one load: backend buffers allocated at once, their contents described as
// HostUploads from the file mappings, and all of them copied by one Backend::upload_tensors.
class LoadPlan {
 public:
  explicit LoadPlan(Backend& backend, const WeightStore& store)
      : backend_(backend), store_(store) {}

  // One part of a buffer: rows [row_begin, + rows) and columns [col_begin, + cols) of the
  // tensor `name`, which must have shape `shape` ([n] is one column).
  struct Part {
    std::string name;
    std::vector<int64_t> shape;
    int64_t row_begin = 0, rows = -1;  // rows -1: all
    int64_t col_begin = 0, cols = -1;  // cols -1: all
  };

  // A buffer of `dtype` holding the parts stacked along rows (all parts have the same cols).
  BackendBuffer buffer(DType dtype, std::vector<Part> parts) {
    int64_t total_rows = 0, cols = -1;
    for (Part& p : parts) {
      const TensorInfo& t = store_.info(p.name);
      if (t.shape != p.shape) {
        throw Error(store_.file_name_of(p.name) + ": tensor '" + p.name + "' has shape " +
                    shape_to_string(t.shape) + ", expected " + shape_to_string(p.shape));
      }
      const int64_t src_cols = p.shape.size() > 1 ? p.shape[1] : 1;
      if (p.rows < 0) p.rows = p.shape[0];
      if (p.cols < 0) p.cols = src_cols;
      cols = p.cols;
      total_rows += p.rows;
    }
    BackendBuffer buf(backend_, static_cast<size_t>(total_rows * cols) * dtype_bytes(dtype));
    int64_t row = 0;
    for (const Part& p : parts) {
      HostUpload u;
      u.dst =
          static_cast<uint8_t*>(buf.get()) + static_cast<size_t>(row * cols) * dtype_bytes(dtype);
      u.dst_dtype = dtype;
      u.src = store_.raw(p.name);
      u.src_dtype = store_.info(p.name).dtype;
      u.src_rows = p.shape[0];
      u.src_cols = p.shape.size() > 1 ? p.shape[1] : 1;
      u.row_begin = p.row_begin;
      u.rows = p.rows;
      u.col_begin = p.col_begin;
      u.cols = p.cols;
      bytes_read_ += static_cast<uint64_t>(u.rows * u.cols) * dtype_bytes(u.src_dtype);
      uploads_.push_back(u);
      used_.insert(p.name);
      row += p.rows;
    }
    return buf;
  }

  void run() { backend_.upload_tensors(uploads_); }
  uint64_t bytes_read() const { return bytes_read_; }
  // Tensors of the checkpoint the model does not use.
  std::vector<std::string> unused() const {
    std::vector<std::string> out;
    for (const std::string& n : store_.names()) {
      if (!used_.count(n)) out.push_back(n);
    }
    return out;
  }

 private:
  Backend& backend_;
  const WeightStore& store_;
  std::vector<HostUpload> uploads_;
  std::set<std::string> used_;
  uint64_t bytes_read_ = 0;
};

DType dtype_of(WeightDtype w) { return w == WeightDtype::kBf16 ? DType::kBF16 : DType::kF32; }

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

Device make_device(const std::string& name, bool own_stream) {
  Device d;
  (void)own_stream;  // the CPU backend has no streams
  if (name == "cpu") {
    d.backend = make_cpu_backend();
    d.ops = make_cpu_model_ops();
    d.weights = WeightDtype::kF32;
    return d;
  }
  if (name == "cuda") {
#if defined(FP8KV_HAVE_CUDA)
    if (!cuda_available()) {
      throw Error(
          "--device cuda: no usable GPU here (fp8kv's kernels need a Hopper GPU, sm_90, "
          "and a CUDA driver); use --device cpu");
    }
    // The calling thread's current GPU (0 unless someone chose another): a --tp rank process
    // selects GPU `rank` (make_nccl_communicator) before it makes its Device.
    int current = 0;
    if (cudaGetDevice(&current) != cudaSuccess) {
      cudaGetLastError();
      current = 0;
    }
    d.backend =
        own_stream ? make_cuda_backend_own_stream(current) : make_cuda_backend(current, nullptr);
    d.ops = make_cuda_model_ops(*d.backend, d.backend->cuda_stream());
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
    for (const BackendBuffer* x :
         {&w.attn_norm, &w.w_qkv, &w.b_qkv, &w.w_o, &w.mlp_norm, &w.w_gate_up, &w.w_down}) {
      b += x->bytes();
    }
  }
  return b;
}

std::unique_ptr<Model> Model::load(const std::string& dir, Backend& backend, bool show_progress,
                                   WeightDtype weights, int tp, int rank) {
  using clock = std::chrono::steady_clock;
  const auto start = clock::now();
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
  using Part = LoadPlan::Part;
  auto rows = [](const std::string& name, std::vector<int64_t> shape, int64_t begin,
                 int64_t count) { return Part{name, std::move(shape), begin, count, 0, -1}; };
  auto cols = [](const std::string& name, std::vector<int64_t> shape, int64_t begin,
                 int64_t count) { return Part{name, std::move(shape), 0, -1, begin, count}; };
  auto whole = [](const std::string& name, std::vector<int64_t> shape) {
    return Part{name, std::move(shape)};
  };

  LoadPlan plan(backend, store);
  const DType wd = dtype_of(weights);
  const DType f32 = DType::kF32;
  m->embed_ = plan.buffer(wd, {whole("model.embed_tokens.weight", {V, H})});
  for (int l = 0; l < c.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    LayerWeights w;
    w.dtype = weights;
    w.attn_norm = plan.buffer(f32, {whole(p + "input_layernorm.weight", {H})});
    // Q, K and V stacked in one matrix (the rank's rows of each), so that the runner projects
    // them in one GEMM: a decode GEMM of few output columns reads its weights far below the
    // bandwidth, and one launch fewer per layer.
    w.w_qkv = plan.buffer(wd, {rows(p + "self_attn.q_proj.weight", {QD, H}, q0, q_len),
                               rows(p + "self_attn.k_proj.weight", {KD, H}, k0, k_len),
                               rows(p + "self_attn.v_proj.weight", {KD, H}, k0, k_len)});
    if (c.attention_bias) {
      w.b_qkv = plan.buffer(f32, {rows(p + "self_attn.q_proj.bias", {QD}, q0, q_len),
                                  rows(p + "self_attn.k_proj.bias", {KD}, k0, k_len),
                                  rows(p + "self_attn.v_proj.bias", {KD}, k0, k_len)});
    }
    w.w_o = plan.buffer(wd, {cols(p + "self_attn.o_proj.weight", {H, QD}, q0, q_len)});
    w.mlp_norm = plan.buffer(f32, {whole(p + "post_attention_layernorm.weight", {H})});
    w.w_gate_up = plan.buffer(wd, {rows(p + "mlp.gate_proj.weight", {I, H}, i0, i_len),
                                   rows(p + "mlp.up_proj.weight", {I, H}, i0, i_len)});
    w.w_down = plan.buffer(wd, {cols(p + "mlp.down_proj.weight", {H, I}, i0, i_len)});
    m->layers_.push_back(std::move(w));
  }
  m->final_norm_ = plan.buffer(f32, {whole("model.norm.weight", {H})});
  if (!c.tie_word_embeddings) m->lm_head_ = plan.buffer(wd, {whole("lm_head.weight", {V, H})});
  const std::vector<float> inv_freq = rope_inv_freq(c);
  m->inv_freq_ = BackendBuffer(backend, inv_freq);
  plan.run();
  backend.synchronize();
  const double seconds = std::chrono::duration<double>(clock::now() - start).count();
  if (show_progress) {
    // Said once: real checkpoints carry tensors the model does not use (rotary caches, a shard's
    // extras); they are skipped.
    const std::vector<std::string> unused = plan.unused();
    size_t skipped = unused.size() + store.unlisted().size();
    if (skipped) {
      const std::string first =
          unused.empty() ? store.unlisted()[0].tensor + "' in " + store.unlisted()[0].file
                         : unused[0] + "' in " + store.file_name_of(unused[0]);
      std::fprintf(stderr, "%s: ignoring %zu tensor%s the model does not use (first: '%s)\n",
                   dir.c_str(), skipped, skipped == 1 ? "" : "s", first.c_str());
    }
    std::fprintf(stderr, "loaded %s in %.2f s (%.2f GB/s)\n", dir.c_str(), seconds,
                 static_cast<double>(plan.bytes_read()) / 1e9 / std::max(seconds, 1e-9));
  }
  return m;
}

CalibExpect calib_expect_for(const ModelConfig& config, KvScheme scheme) {
  CalibExpect e;
  e.architectures = config.architecture;
  e.num_layers = config.num_layers;
  e.num_kv_heads = config.num_kv_heads;
  e.quant_type = calib_quant_type(scheme);
  return e;
}

RankScales load_scales_for_model(const std::string& calib_path, const ModelConfig& config,
                                 KvScheme scheme, const TpShard& shard) {
  if (!has_kv_scales(scheme)) {
    throw Error(std::string("the ") + scheme_name(scheme) + " KV cache takes no calibration file" +
                (is_fp8(scheme) ? " (it has no scales: K/V are rounded to e5m2 as they are)" : ""));
  }
  // Any format load_kv_scales reads: kv_cache_calib.json, a quant-param JSON, scale tensors; a
  // per_tensor one broadcast to every KV head for the per-head schemes.
  return scales_for_scheme(load_kv_scales(calib_path, calib_expect_for(config, scheme)).data,
                           scheme, shard.tp, shard.rank);
}

}  // namespace fp8kv
