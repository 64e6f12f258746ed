// The Llama-family model runner: weights, model ops, and the forward pass over the KV pool.
//
// One forward pass runs a batch of requests, each with some new tokens (prefill: many, decode:
// one), through every layer:
//   RMSNorm -> the QKV projection (+bias) -> RoPE -> K/V into the pool (quantize-on-write,
//   observing abs-max when calibrating) -> [fp8-per-head: quantize Q] -> attention over the pool
//   -> O projection -> residual -> RMSNorm -> SiLU(gate) * up -> down -> residual,
// then the final RMSNorm and the LM head on the rows whose logits are wanted. Under tensor
// parallelism (TpShard) each rank runs its heads and intermediate rows, and the partial sums of
// the O and down projections are all-reduced before each residual add.
// Activations are fp32; Q, K and V go to the attention Backend as bf16. Weight matrices are
// fp32 (the CPU) or bf16 (the GPU: cuBLAS bf16 x bf16 -> fp32 GEMMs, half the bytes to read).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "fp8kv/backend.h"
#include "fp8kv/calib.h"
#include "fp8kv/export.h"
#include "fp8kv/kv_pool.h"
#include "fp8kv/model_config.h"
#include "fp8kv/model_ops.h"
#include "fp8kv/observer.h"
#include "fp8kv/scheme.h"

namespace fp8kv {

FP8KV_API const char* weight_dtype_name(WeightDtype t);  // "fp32", "bf16"

// Where a model runs: "cpu" (fp32 weights) or "cuda" (the current CUDA device, GPU 0 unless
// cudaSetDevice chose another; bf16 weights). The backend is
// declared first, so the ops go first on destruction.
struct Device {
  std::unique_ptr<Backend> backend;
  std::unique_ptr<ModelOps> ops;
  WeightDtype weights = WeightDtype::kF32;
};
// Throws Error for an unknown name, for "cuda" in a build without CUDA, and (from
// make_cuda_backend) when no usable GPU is present. own_stream: the CUDA backend and ops run on
// a stream of the backend's own rather than the legacy default stream (make_cuda_backend_own_
// stream), which RunnerOptions::cuda_graph needs; the CPU ignores it.
FP8KV_API Device make_device(const std::string& name, bool own_stream = false);

// One rank's part of the model under Megatron-style tensor parallelism (FORMATS.md, "Tensor
// parallelism"): rank r of tp holds Q heads [q_head_begin, + q_heads), the rank's KV heads (the
// KV heads of those Q heads: kv_heads = h = max(1, Hkv / tp), replicated when tp > Hkv), the
// matching rows of q/k/v_proj and columns of o_proj, and intermediate rows [inter_begin,
// + inter) of gate/up_proj and columns of down_proj. Embedding, norms and LM head are whole on
// every rank; o_proj and down_proj give partial sums that the ranks all-reduce.
struct TpShard {
  int tp = 1;
  int rank = 0;
  int q_heads = 0;        // Hq / tp
  int q_head_begin = 0;   // rank * Hq / tp
  int kv_heads = 0;       // h = max(1, Hkv / tp)
  int kv_head_begin = 0;  // rank * h / f, f = tp * h / Hkv (the replication factor)
  int inter = 0;          // I / tp
  int inter_begin = 0;    // rank * I / tp
};
// Throws Error unless tp divides Hq and I, tp divides Hkv or Hkv divides tp, and
// 0 <= rank < tp.
FP8KV_API TpShard make_tp_shard(const ModelConfig& config, int tp, int rank);

// Weights in the backend's memory. Torch Linear layout: [out_features, in_features]; the
// matrices are `dtype` (fp32 or bf16), the norm weights and biases fp32. Shapes are the rank's
// (TpShard): Hq = q_heads, Hkv = kv_heads, I = inter; tp = 1 gives the whole model.
struct LayerWeights {
  WeightDtype dtype = WeightDtype::kF32;
  WeightView view(const BackendBuffer& b) const { return {b.get(), dtype}; }
  BackendBuffer attn_norm;  // [H]
  BackendBuffer w_qkv;      // [(Hq + 2 * Hkv) * D, H]: the rank's q_proj rows, then its k_proj
                            // rows, then its v_proj rows: one GEMM for Q, K and V, whose K/V
                            // columns are already the pool's per-token layout (K heads, V heads)
  BackendBuffer b_qkv;      // [(Hq + 2 * Hkv) * D], the same rows; empty without attention_bias
  BackendBuffer w_o;        // [H, Hq * D]: the rank's columns of o_proj
  BackendBuffer mlp_norm;   // [H]
  BackendBuffer w_gate_up;  // [2 * I, H]: gate_proj rows, then up_proj rows
  BackendBuffer w_down;     // [H, I]: the rank's columns of down_proj
};

class FP8KV_API Model {
 public:
  // Reads DIR/config.json and the weights (bf16, f16 or f32 safetensors, sharded or not); the
  // weight matrices and the embedding table are kept as `weights` (fp32 for the CPU ops, bf16
  // for the CUDA ops). Throws Error naming the file and tensor on a missing tensor or a wrong
  // shape (before anything is copied). With tp > 1 only rank `rank`'s shard is read: the slices
  // are taken while copying (make_tp_shard's refusals apply). The tensors go from the file
  // mappings to the backend in one Backend::upload_tensors (no fp32 round trip for bf16 and
  // f16 on the GPU). With show_progress, prints "loaded DIR in X s (Y GB/s)" to stderr (Y: the
  // checkpoint bytes read) and, once, how many checkpoint tensors the model does not use.
  static std::unique_ptr<Model> load(const std::string& dir, Backend& backend,
                                     bool show_progress = false,
                                     WeightDtype weights = WeightDtype::kF32, int tp = 1,
                                     int rank = 0);

  const ModelConfig& config() const { return config_; }  // the whole model's
  const TpShard& shard() const { return shard_; }
  const std::string& dir() const { return dir_; }
  const LayerWeights& layer(int l) const { return layers_[static_cast<size_t>(l)]; }
  WeightDtype weight_dtype() const { return weights_; }
  WeightView embed() const { return {embed_.get(), weights_}; }              // [V, H]
  const float* final_norm() const { return final_norm_.as<const float>(); }  // [H]
  WeightView lm_head() const {                                               // [V, H]
    return lm_head_.empty() ? embed() : WeightView{lm_head_.get(), weights_};
  }
  size_t weight_bytes() const;  // everything load() allocated
  const float* inv_freq() const { return inv_freq_.as<const float>(); }  // [D / 2]

 private:
  ModelConfig config_;
  TpShard shard_;
  std::string dir_;
  WeightDtype weights_ = WeightDtype::kF32;
  std::vector<LayerWeights> layers_;
  BackendBuffer embed_, final_norm_, lm_head_, inv_freq_;
};

// The calibration file's expectations for this model and scheme, and the scales for `shard`'s
// rank (scales_for_scheme: a per_tensor file serves the per-head schemes, broadcast to every KV
// head). Throws Error (from the loader) on any mismatch.
FP8KV_API RankScales load_scales_for_model(const std::string& calib_path, const ModelConfig& config,
                                           KvScheme scheme, const TpShard& shard = {});
FP8KV_API CalibExpect calib_expect_for(const ModelConfig& config, KvScheme scheme);

// A second KV scheme run beside the main one, on the main run's very inputs: each layer also
// writes K/V into a pool of this scheme and runs attention over it, and the difference of its
// attention output from the main one is accumulated (the eval's per-layer error).
struct ShadowScheme {
  KvScheme scheme = KvScheme::kFp8PerHead;
  RankScales scales;  // fp8-per-head: static Q scales when scales.q is set, dynamic otherwise
};

// Per layer and per (layer, KV head): sums over the attention outputs of (shadow - main)^2
// and of main^2. A KV head's sums cover the outputs of the query heads that read it (its GQA
// group), so the per-head sums of a layer add up to the layer's.
struct FP8KV_API AttentionErrorStats {
  KvScheme scheme = KvScheme::kFp8PerHead;
  int num_kv_heads = 0;              // the whole model's KV heads (the per-head rows' width)
  std::vector<double> diff_sq;       // [layers]
  std::vector<double> ref_sq;        // [layers]
  std::vector<double> head_diff_sq;  // [layers, num_kv_heads]
  std::vector<double> head_ref_sq;   // [layers, num_kv_heads]

  AttentionErrorStats() = default;
  // All sums zero. Throws Error unless num_layers >= 1 and num_kv_heads >= 1.
  AttentionErrorStats(KvScheme scheme, int num_layers, int num_kv_heads);
  double rel_error(int layer) const;                    // ||shadow - main|| / ||main||
  double head_rel_error(int layer, int kv_head) const;  // the same over one KV head's group
  // Accounts one pass of layer `layer`: main and shadow are [rows, q_heads * head_dim] bf16
  // attention outputs of one rank; its query heads [j * g, (j + 1) * g), g = q_heads /
  // kv_heads, read its KV head j, which is the model's KV head kv_head_begin + j (TpShard).
  // Throws Error when the heads do not fit (kv_heads not dividing q_heads, past num_kv_heads).
  void add(int layer, const uint16_t* main, const uint16_t* shadow, int64_t rows, int q_heads,
           int kv_heads, int kv_head_begin, int head_dim);
};

struct RunnerOptions {
  KvScheme scheme = KvScheme::kBf16;
  // Required for the FP8 schemes (refused without): the rank's scales (load_scales_for_model).
  // fp8-per-head quantizes Q with the static scales of scales->q (q_calibration) when the file
  // has them, with dynamic per-(request, KV head) scales otherwise.
  std::optional<RankScales> scales;
  // fp8-per-head with static Q scales: keep the running abs-max of Q per (layer, KV head) that
  // quantize_q saw (q_amax()), to tell how much of the static range Q used (eval). One
  // synchronization per layer.
  bool record_q_amax = false;
  // Calibration: a bf16 cache whose writes are observed. Every forward pass is one pass of
  // each layer for the observer; layers stop observing once they have their count.
  Observer* observer = nullptr;
  int64_t num_slots = 8192;
  int max_requests = 64;
  int max_len = 4096;
  // How the pool's slots go to tokens (SlotAllocator): pages of 64 per request window, or
  // LightLLM's token order (bench model --slot-policy compares them).
  SlotPolicy slot_policy = SlotPolicy::kPages;
  std::vector<ShadowScheme> shadows;
  // FP8 schemes (main pool and every shadow): these layers keep their K/V in bf16
  // (--kv-bf16-layers; KvPool). Their scales are still required and simply unused.
  std::vector<int> bf16_layers;
  // Tensor parallelism: the group of the model's shard (world size = shard().tp, rank =
  // shard().rank); required when tp > 1, null otherwise. Every rank runs the same calls.
  Communicator* comm = nullptr;
  // Every linear through ModelOps::linear_ordered, the all-reduces as a rank-order tree and
  // decode's KV split planned for the whole model's KV heads (AttentionParams::split_kv_heads),
  // so that the hidden states at tp = 2, 4, 8 equal tp = 1's bit for bit (the row-parallel runs
  // are model-wide: see exact_tp_chunks). Slower GEMMs; calibration turns it on, generate
  // --exact-tp too. (Not with fp8-per-head and more ranks than KV heads: see quantize_q there.)
  bool exact_tp = false;
  // Decode steps as CUDA graphs (--cuda-graph): a decode step's device work (embedding, every
  // layer, the logits and the device argmax) is recorded once per launch configuration (batch
  // size, logit rows, each layer's decode split of the KV length) and replayed, its inputs
  // written into the same buffers before each replay; same kernels, same arguments, so the same
  // bits as the eager step. Prefill passes stay eager. Needs the CUDA backend (the CPU backend
  // refuses it); runs eagerly, saying why once on stderr, when the run cannot be recorded (a
  // backend on the legacy default stream: make_device(..., own_stream = true); calibration,
  // record_q_amax, shadow schemes, tensor parallelism).
  bool cuda_graph = false;
};

// What RunnerOptions::cuda_graph did so far.
struct GraphStats {
  int64_t captures = 0;      // decode steps recorded (each one then replayed at once)
  int64_t replays = 0;       // decode steps run as a graph (the recorded ones included)
  int64_t eager_decode = 0;  // decode steps run eagerly (warm-ups, refusals)
  int64_t failed = 0;        // recordings that failed (those steps ran eagerly)
};

// The number of k runs of the whole model's row-parallel linears under exact_tp: the largest
// power of two up to 8 that divides both the Q heads and the intermediate size. A rank of tp
// (tp dividing it) sums chunks / tp of them; any other tp falls back to one run per rank.
FP8KV_API int exact_tp_chunks(const ModelConfig& config);

enum class LogitRows {
  kLast,  // the last new token of each request: [B, V]
  kAll,   // every new token: [total_new, V]
  kNone,  // no logits (calibration)
};

class FP8KV_API ModelRunner {
 public:
  // Throws Error when an FP8 scheme comes without scales, or the scales do not fit the model.
  ModelRunner(const Model& model, Backend& backend, ModelOps& ops, RunnerOptions options);
  ~ModelRunner();

  int add_request() { return table_.add_request(); }
  void release(int req) { table_.release(req); }
  int seq_len(int req) const { return table_.seq_len(req); }
  int64_t free_slots() const { return table_.free_slots(); }

  // One forward pass: tokens[b] are appended to request reqs[b]. Uses decode attention when
  // every request has exactly one new token, prefill attention otherwise. Returns host logits
  // ([rows, V], see LogitRows). Throws Error (changing nothing) when the slots run out.
  std::vector<float> forward(const std::vector<int>& reqs,
                             const std::vector<std::vector<int32_t>>& tokens, LogitRows rows);
  // The same pass with LogitRows::kLast, reduced on the device to each request's greedy next
  // token (the first index of the largest logit, as generate() picks): [B] token ids. Only B
  // ints come back to the host, not [B, V] logits.
  std::vector<int32_t> forward_greedy(const std::vector<int>& reqs,
                                      const std::vector<std::vector<int32_t>>& tokens);

  // Benchmarks only: appends `count` tokens to each request without running the model. Their
  // K/V rows, the same pseudo-random bf16 values in [-2, 2) for every layer (from `seed`), go
  // through quantize_kv into every layer of the pool (and of the shadow pools) at fresh slots,
  // so a decode step afterwards reads a context of the full length. Seconds instead of a long
  // prefill; the attention output is meaningless, the bytes read and the work done are real.
  // Throws Error, changing nothing, when the slots run out or a request would pass max_len.
  // `by_steps`: the slots are taken a token per request per step, in the order a batch that
  // decodes grows (the table a long-running server's batch has); else a run per request. The
  // values at each position are the same either way (only the slots differ), so are the logits.
  void append_random_context(const std::vector<int>& reqs, int count, uint64_t seed = 0,
                             bool by_steps = false);

  size_t kv_pool_bytes() const { return pool_.bytes(); }  // the main pool, all layers

  // Greedy generation (temperature 0) or sampling: prefill all prompts in one pass, then
  // decode `max_new` tokens per prompt in batches. Returns the new tokens of each prompt.
  // The requests are released at the end.
  std::vector<std::vector<int32_t>> generate(const std::vector<std::vector<int32_t>>& prompts,
                                             int max_new, float temperature = 0.0f,
                                             uint64_t seed = 0);

  const std::vector<AttentionErrorStats>& shadow_stats() const { return shadow_stats_; }
  // RunnerOptions::record_q_amax: [layers, this rank's KV heads], over every pass so far.
  const std::vector<float>& q_amax() const { return q_amax_; }
  const RunnerOptions& options() const { return options_; }
  const GraphStats& graph_stats() const { return graph_stats_; }
  // Turns RunnerOptions::cuda_graph on or off for the next passes (the benchmark times both
  // ways on one runner). Throws Error, as the constructor does, when the backend is not CUDA.
  void set_cuda_graph(bool on);

 private:
  struct Shadow;
  struct StepGraphs;
  // The pass up to the logits: leaves [R, V] logits in the scratch and returns R; with greedy,
  // also each row's argmax in the scratch's `next`.
  int64_t run_forward(const std::vector<int>& reqs, const std::vector<std::vector<int32_t>>& tokens,
                      LogitRows rows, bool greedy = false);
  // The device work of one pass over the scratch inputs (uploaded before): embedding, the
  // layers, then with R > 0 the logits of the R rows in s.rows, and with greedy their argmax.
  void queue_step(bool decode, int64_t R, bool greedy);
  // A decode step through a recorded graph (RunnerOptions::cuda_graph): replays, records or
  // runs it eagerly (see model_runner.cpp); false when graphs are off for this run.
  bool graph_step(int64_t R, bool greedy);
  // One layer over the scratch activations of the current pass: the forward pass, calling the
  // hooks below around its attention.
  void run_layer(int l, bool decode);
  // Whether run_layer hands the GEMMs bf16 inputs (ModelOps::bf16_gemm_inputs): ops that ask
  // for it, bf16 weights, and no exact_tp (linear_ordered takes fp32 activations).
  bool bf16_gemm_inputs() const;
  // Layer l's K/V (scratch kv16) into `cache` (quantize-on-write, abs-max into observe_amax
  // [2 * Hkv] when not null), then attention over it into `out` [T, Hq * D] bf16. q_scales:
  // static Q scales [L, Hkv] or empty (dynamic). observe_q_amax: [Hkv] running abs-max of Q,
  // when not null (quantize_q runs for it with a bf16 cache too).
  void attend(int l, bool decode, KvCacheLayer cache, const BackendBuffer& kv_scales, int row_width,
              const BackendBuffer& q_scales, float* observe_amax, float* observe_q_amax,
              uint16_t* out);
  // The attention's shapes over `cache` for the current pass (heads, cache, batch, the exact-tp
  // split): what attend() gives the backend and what graph_step() keys a recording on.
  AttentionParams attention_shape(KvCacheLayer cache) const;
  // Calibration hooks: where layer l's abs-max goes this pass (null: not observed), and handing
  // it to the observer after the attention.
  float* begin_observation(int l);
  void end_observation(int l, const float* amax);
  // Eval hook: every shadow scheme's attention on layer l's inputs, its error accounted.
  void run_shadows(int l, bool decode);
  // buf[0, n) = sum over tensor-parallel ranks, in place (nothing when tp = 1).
  void all_reduce_sum(BackendBuffer& buf, int64_t n);

  const Model& model_;
  Backend& backend_;
  ModelOps& ops_;
  RunnerOptions options_;
  RequestTable table_;
  KvPool pool_;
  BackendBuffer kv_scales_;  // [L, row width] (FP8 schemes)
  BackendBuffer q_scales_;   // [L, Hkv] static Q scales (fp8-per-head with q_calibration)
  std::vector<std::unique_ptr<Shadow>> shadows_;
  std::vector<AttentionErrorStats> shadow_stats_;
  std::vector<float> q_amax_;  // record_q_amax: [L, Hkv]
  struct Scratch;
  std::unique_ptr<Scratch> s_;
  std::unique_ptr<StepGraphs> graphs_;  // RunnerOptions::cuda_graph
  GraphStats graph_stats_;
};

}  // namespace fp8kv
