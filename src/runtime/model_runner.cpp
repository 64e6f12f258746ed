// The model runner (model.h): one forward pass = host bookkeeping (slots, positions), the
// step's small index arrays uploaded into scratch buffers, then the device work queued on the
// backend's stream (embedding, the layers, the logits rows).
//
// Decode steps as CUDA graphs (RunnerOptions::cuda_graph). A decode step's device work is a
// fixed sequence of launches whose configuration depends only on
//   - the batch size B (= the new tokens T; the GEMMs' m, every grid),
//   - the logit rows R and whether the device argmax runs (forward vs forward_greedy),
//   - each layer's decode launch (Backend::decode_launch_key: the split of the KV length, which
//     changes in steps as max_seq_len grows, e.g. every 64 * num_splits tokens),
// and on pointers that stay put: the scratch buffers, the pool, the weights, the request table
// and the backends' workspaces. Everything else that changes per step (token ids, positions,
// slots, seq_len, req_index, cu_seqlens_q, the decode order, the logit row indices, the request
// table's new entries) is data in those buffers, uploaded before the step as in the eager path. So
// a step is recorded once per key (B, R, greedy, the layers' decode keys) and replayed with
// StepGraph::launch; the replay runs the recorded kernels with the recorded arguments, which
// gives the eager step's bits. A recording is valid while no memory it points into was freed:
// the backend's and the ops' memory_epoch() are part of the check (a grown scratch buffer, a
// grown decode workspace or GEMM input copy bump them), and a stale graph is recorded again.
//
// Recording needs a step whose every allocation is already done (a capture cannot allocate or
// synchronize), so a key is first run eagerly once (the warm-up: workspaces grow there), and the
// next step of that key, the epochs unchanged, is recorded and replayed. A recording that fails
// (a call synchronized, an argument was refused) runs that step eagerly; the key is not tried
// again. Graphs are off for a run that reads results back on the host inside the step
// (calibration, record_q_amax, shadow schemes), for tensor parallelism (its all-reduces go
// through the communicator) and for backends that cannot record (Backend::capture_unsupported:
// the CPU backend is refused at construction, a CUDA backend on the legacy default stream runs
// eagerly); the reason is printed once. Prefill passes always run eagerly. The device error
// record works as before: a replayed kernel's refusal is thrown by the next synchronize().
// At most kMaxStepGraphs graphs are kept (least recently used goes first).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <numeric>
#include <string>
#include <tuple>

#include "fp8kv/error.h"
#include "fp8kv/fp8.h"
#include "fp8kv/model.h"
#include "kernels/ordered_linear.h"

namespace fp8kv {

namespace {

// The largest power of two up to cap that divides k.
int ordered_chunks(int64_t k, int cap) {
  int c = 1;
  while (c * 2 <= cap && k % (c * 2) == 0) c *= 2;
  return c;
}

// Element i of the sum over ranks [lo, hi) of parts (rank r's values at r * stride) as a
// balanced binary tree, left half + right half: the top of the tp = 1 run tree (exact_tp).
float rank_tree(const float* parts, size_t stride, int lo, int hi, size_t i) {
  if (hi - lo == 1) return parts[static_cast<size_t>(lo) * stride + i];
  const int mid = lo + (hi - lo) / 2;
  return rank_tree(parts, stride, lo, mid, i) + rank_tree(parts, stride, mid, hi, i);
}

// Checks that `scales` fit `scheme` and the model's shard (`kv_heads` KV heads on this rank);
// `what` names the run in messages.
void check_scales(KvScheme scheme, const std::optional<RankScales>& scales, const ModelConfig& c,
                  int kv_heads, const std::string& what) {
  const std::optional<QuantType> want = calib_quant_type(scheme);
  if (!want) {
    // bf16 ignores scales; fp8-e5m2 refuses them: its scale is 1 by definition, and a file given
    // for it was meant for another scheme.
    if (is_fp8(scheme) && scales && !scales->kv.empty()) {
      throw Error(what + ": the " + std::string(scheme_name(scheme)) +
                  " KV cache takes no calibration file (no scales: K/V are rounded to e5m2 as they "
                  "are); drop --calib, or pick fp8-per-head / fp8-per-tensor for these scales");
    }
    return;
  }
  if (!scales) {
    throw Error(what + ": the " + std::string(scheme_name(scheme)) +
                " KV cache needs calibrated scales (a kv_cache_calib.json made by `fp8kv "
                "calibrate`); refusing to run with scales of 1.0");
  }
  if (scales->quant_type != *want) {
    throw Error(what + ": the " + std::string(scheme_name(scheme)) + " KV cache needs " +
                quant_type_name(*want) + " scales, got " + quant_type_name(scales->quant_type) +
                (quant_type_serves(scales->quant_type, *want)
                     ? " (scales_for_scheme, not slice_for_rank, broadcasts per_tensor scales to "
                       "every KV head)"
                     : ""));
  }
  if (scales->num_layers != c.num_layers) {
    throw Error(what + ": scales for " + std::to_string(scales->num_layers) +
                " layers, the model has " + std::to_string(c.num_layers));
  }
  if (*want == QuantType::kPerHead && scales->heads_per_rank != kv_heads) {
    throw Error(what + ": scales for " + std::to_string(scales->heads_per_rank) +
                " KV heads, the model (this rank) has " + std::to_string(kv_heads));
  }
  if (scales->kv.size() != static_cast<size_t>(c.num_layers) * scales->row_width()) {
    throw Error(what + ": scales array has " + std::to_string(scales->kv.size()) +
                " values, expected " + std::to_string(c.num_layers * scales->row_width()));
  }
  if (scales->q && scales->q->size() != static_cast<size_t>(c.num_layers) * kv_heads) {
    throw Error(what + ": static Q scales have " + std::to_string(scales->q->size()) +
                " values, expected " + std::to_string(c.num_layers * kv_heads));
  }
}

BackendBuffer upload_vector(Backend& backend, const std::vector<float>& v) {
  BackendBuffer b(backend, std::max<size_t>(1, v.size()) * sizeof(float));
  b.upload(v.data(), v.size() * sizeof(float));
  return b;
}

uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

}  // namespace

int exact_tp_chunks(const ModelConfig& c) {
  return ordered_chunks(std::gcd<int64_t, int64_t>(c.num_q_heads, c.intermediate_size),
                        kMaxOrderedChunks);
}

// A shadow scheme's own pool and scales, plus its attention output.
struct ModelRunner::Shadow {
  KvScheme scheme;
  KvPool pool;
  BackendBuffer kv_scales;  // [L, row width]
  BackendBuffer q_scales;   // [L, Hkv] or empty
  int row_width;
};

// Activations of one forward pass, grown as needed. Shapes for T new tokens, B requests; Hq,
// Hkv and I are the rank's (TpShard), H is whole.
struct ModelRunner::Scratch {
  BackendBuffer ids, pos, slots;     // [T] int32
  BackendBuffer seq_len, req_index;  // [B] int32
  BackendBuffer order;               // [B] int32: a decode step's decode_order
  BackendBuffer cu_q;                // [B + 1] int32
  BackendBuffer x;                   // [T, H] residual stream
  BackendBuffer h;                   // [T, H] normed
  BackendBuffer a;                   // [T, H] projection output
  BackendBuffer qkv;                 // [T, Hq * D + 2 * Hkv * D]: Q, then K and V (w_qkv)
  BackendBuffer q16;                 // [T, Hq * D] bf16
  BackendBuffer kv16;                // [T, 2 * Hkv * D] bf16
  BackendBuffer q8;                  // [T, Hq * D] e4m3
  BackendBuffer q_scale;             // [B, Hkv]
  BackendBuffer o16, o16_shadow;     // [T, Hq * D] bf16
  BackendBuffer o;                   // [T, Hq * D]
  BackendBuffer gu;                  // [T, 2 * I]
  BackendBuffer mlp;                 // [T, I]
  BackendBuffer x16;                 // [T, max(H, I)] bf16 GEMM input (bf16_gemm_inputs)
  BackendBuffer amax;                // [3 * Hkv]: K, V, then Q (observer with Q scales)
  BackendBuffer rows;                // [R] int32 rows with logits
  BackendBuffer logits;              // [R, V]
  BackendBuffer next;                // [R] int32 greedy tokens (forward_greedy)
  int64_t T = 0;
  int B = 0;
  AttentionBatch batch;
  std::vector<float> host_amax;
  std::vector<uint16_t> host_o, host_o_shadow;
  std::vector<float> host_reduce;  // [T, H] staging of the tensor-parallel all-reduce
  std::vector<float> host_gather;  // [tp, T, H] (exact_tp)
};

constexpr size_t kMaxStepGraphs = 8;

// The recorded decode steps of RunnerOptions::cuda_graph and what is known about each key.
struct ModelRunner::StepGraphs {
  struct Key {
    int B = 0;
    int64_t R = 0;
    bool greedy = false;
    std::vector<uint64_t> decode;  // [L] Backend::decode_launch_key of each layer
    bool operator==(const Key& o) const {
      return std::tie(B, R, greedy, decode) == std::tie(o.B, o.R, o.greedy, o.decode);
    }
  };
  using Epoch = std::pair<uint64_t, uint64_t>;  // backend's, ops' memory_epoch()
  struct Entry {
    Key key;
    std::unique_ptr<StepGraph> graph;  // null until recorded
    Epoch epoch;                       // of the graph
    bool warm = false;                 // an eager step of this key ran ...
    Epoch warm_epoch;                  // ... and left the epochs at this
    bool failed = false;               // recording failed: always eager
    uint64_t last_use = 0;
  };
  std::vector<Entry> entries;
  uint64_t clock = 0;
  bool checked = false;  // blocker below decided
  std::string blocker;   // why graphs are off for this run (empty: on)
  bool said = false;     // a reason was printed
};

ModelRunner::ModelRunner(const Model& model, Backend& backend, ModelOps& ops, RunnerOptions options)
    : model_(model),
      backend_(backend),
      ops_(ops),
      options_(std::move(options)),
      table_(backend, options_.max_requests, options_.max_len, options_.num_slots,
             options_.slot_policy),
      pool_(backend, model.config().num_layers, options_.num_slots, model.shard().kv_heads,
            model.config().head_dim, options_.scheme, options_.bf16_layers),
      s_(std::make_unique<Scratch>()) {
  const ModelConfig& c = model.config();
  if (c.head_dim > 1024) {
    throw Error("head_dim " + std::to_string(c.head_dim) + " is larger than 1024");
  }
  const TpShard& shard = model.shard();
  if (shard.tp > 1 && (options_.comm == nullptr || options_.comm->world_size() != shard.tp ||
                       options_.comm->rank() != shard.rank)) {
    throw Error("model runner: the model is rank " + std::to_string(shard.rank) + " of tp " +
                std::to_string(shard.tp) + "; it needs a communicator of that rank and size");
  }
  check_scales(options_.scheme, options_.scales, c, shard.kv_heads, "model runner");
  if (has_kv_scales(options_.scheme)) {
    kv_scales_ = upload_vector(backend, options_.scales->kv);
    if (fp8_q(options_.scheme) && options_.scales->q) {
      q_scales_ = upload_vector(backend, *options_.scales->q);
    }
  }
  if (options_.observer) {
    if (options_.scheme != KvScheme::kBf16) {
      throw Error("calibration observes a bf16 KV cache, not " +
                  std::string(scheme_name(options_.scheme)));
    }
    const ObserverConfig& oc = options_.observer->config();
    if (oc.num_layers != c.num_layers || oc.num_kv_heads != shard.kv_heads) {
      throw Error("observer is set up for " + std::to_string(oc.num_layers) + " layers and " +
                  std::to_string(oc.num_kv_heads) + " KV heads, the model (this rank) has " +
                  std::to_string(c.num_layers) + " and " + std::to_string(shard.kv_heads));
    }
  }
  for (const ShadowScheme& sh : options_.shadows) {
    check_scales(sh.scheme, sh.scales, c, shard.kv_heads,
                 std::string("shadow ") + scheme_name(sh.scheme));
    if (!is_fp8(sh.scheme)) throw Error("a shadow scheme must be an FP8 scheme");
    auto s = std::unique_ptr<Shadow>(
        new Shadow{sh.scheme,
                   KvPool(backend, c.num_layers, options_.num_slots, shard.kv_heads, c.head_dim,
                          sh.scheme, options_.bf16_layers),
                   upload_vector(backend, sh.scales.kv), BackendBuffer(),
                   2 * kv_scales_per_layer(sh.scheme, shard.kv_heads)});
    if (fp8_q(sh.scheme) && sh.scales.q) {
      s->q_scales = upload_vector(backend, *sh.scales.q);
    }
    shadows_.push_back(std::move(s));
    shadow_stats_.emplace_back(sh.scheme, c.num_layers, c.num_kv_heads);
  }
  if (options_.cuda_graph) set_cuda_graph(true);
}

ModelRunner::~ModelRunner() = default;

void ModelRunner::set_cuda_graph(bool on) {
  if (on && !backend_.records_graphs()) {
    throw Error(
        "model runner: cuda_graph (--cuda-graph) records decode steps as CUDA graphs and "
        "needs the CUDA backend; the " +
        backend_.name() +
        " backend runs every call at once (drop --cuda-graph or use --device cuda)");
  }
  options_.cuda_graph = on;
  if (on && !graphs_) {
    graphs_ = std::make_unique<StepGraphs>();
    ops_.prepare_capture();
  }
}

std::vector<float> ModelRunner::forward(const std::vector<int>& reqs,
                                        const std::vector<std::vector<int32_t>>& tokens,
                                        LogitRows rows) {
  const int64_t R = run_forward(reqs, tokens, rows);
  if (R == 0) {
    backend_.synchronize();
    return {};
  }
  const int64_t V = model_.config().vocab_size;
  std::vector<float> out(static_cast<size_t>(R * V));
  // The download waits for the queued pass (and surfaces its errors).
  s_->logits.download(out.data(), static_cast<size_t>(R * V) * sizeof(float));
  return out;
}

std::vector<int32_t> ModelRunner::forward_greedy(const std::vector<int>& reqs,
                                                 const std::vector<std::vector<int32_t>>& tokens) {
  const int64_t R = run_forward(reqs, tokens, LogitRows::kLast, /*greedy=*/true);
  if (R == 0) return {};
  Scratch& s = *s_;
  std::vector<int32_t> out(static_cast<size_t>(R));
  s.next.download(out.data(), out.size() * sizeof(int32_t));
  return out;
}

void ModelRunner::append_random_context(const std::vector<int>& reqs, int count, uint64_t seed,
                                        bool by_steps) {
  if (count < 0) throw Error("append_random_context: negative count " + std::to_string(count));
  if (count == 0 || reqs.empty()) return;
  const ModelConfig& c = model_.config();
  const int Hkv = model_.shard().kv_heads;
  const int64_t KVD = 2ll * Hkv * c.head_dim;
  // One chunk of rows, uploaded once and written again for every chunk of every request.
  const int chunk = std::min(count, 4096);
  std::vector<uint16_t> host(static_cast<size_t>(chunk * KVD));
  uint64_t rng = seed ^ 0x5eedf00dull;
  for (uint16_t& v : host) {
    const double u = static_cast<double>(splitmix64(rng) >> 11) * 0x1.0p-53;  // [0, 1)
    v = float_to_bf16(static_cast<float>(4.0 * u - 2.0));
  }
  BackendBuffer kv(backend_, host.size() * sizeof(uint16_t));
  kv.upload(host.data(), host.size() * sizeof(uint16_t));
  BackendBuffer slot_buf(backend_, static_cast<size_t>(chunk) * sizeof(int32_t));
  // Every slot taken at once (all or nothing: RequestTable::extend), each request's in position
  // order; the writes below go request by request in chunks.
  const std::vector<int32_t> all_slots =
      table_.extend(reqs, std::vector<int>(reqs.size(), count), by_steps);
  for (size_t b = 0; b < reqs.size(); ++b) {
    for (int done = 0; done < count; done += chunk) {
      const int n = std::min(chunk, count - done);
      const int32_t* slots = all_slots.data() + b * static_cast<size_t>(count) + done;
      // The previous chunk's writes may still read slot_buf: the upload is queued behind them.
      slot_buf.upload(slots, static_cast<size_t>(n) * sizeof(int32_t));
      auto write = [&](const KvPool& pool, const BackendBuffer& kv_scales, int row_width) {
        for (int l = 0; l < c.num_layers; ++l) {
          QuantizeKvParams qk;
          qk.kv = kv.as<const uint16_t>();
          qk.slots = slot_buf.as<const int32_t>();
          qk.num_tokens = n;
          qk.slots_unchanged = l > 0;  // checked at layer 0 of this chunk
          qk.cache = pool.layer(l);
          if (has_kv_scales(qk.cache.scheme)) {  // a --kv-bf16-layers layer takes no scales
            qk.scales.k = kv_scales.as<const float>() + static_cast<int64_t>(l) * row_width;
            qk.scales.v = qk.scales.k + row_width / 2;
          }
          backend_.quantize_kv(qk);
        }
      };
      write(pool_, kv_scales_, 2 * kv_scales_per_layer(options_.scheme, Hkv));
      for (const auto& sh : shadows_) write(sh->pool, sh->kv_scales, sh->row_width);
    }
  }
  backend_.synchronize();
}

int64_t ModelRunner::run_forward(const std::vector<int>& reqs,
                                 const std::vector<std::vector<int32_t>>& tokens, LogitRows rows,
                                 bool greedy) {
  const ModelConfig& c = model_.config();
  if (reqs.size() != tokens.size()) throw Error("forward: reqs and tokens differ in size");
  const int B = static_cast<int>(reqs.size());
  std::vector<int> q_lens(static_cast<size_t>(B));
  std::vector<int32_t> ids;
  for (int b = 0; b < B; ++b) {
    q_lens[static_cast<size_t>(b)] = static_cast<int>(tokens[static_cast<size_t>(b)].size());
    if (q_lens[static_cast<size_t>(b)] == 0) {
      throw Error("forward: request " + std::to_string(reqs[static_cast<size_t>(b)]) +
                  " has no new tokens");
    }
    for (int32_t t : tokens[static_cast<size_t>(b)]) {
      if (t < 0 || t >= c.vocab_size) {
        throw Error("token id " + std::to_string(t) + " is outside the vocabulary [0, " +
                    std::to_string(c.vocab_size) + ")");
      }
      ids.push_back(t);
    }
  }
  if (B == 0) return 0;
  // All or nothing: throws before anything changes when the slots run out.
  const std::vector<int32_t> slots = table_.extend(reqs, q_lens);

  const int64_t T = static_cast<int64_t>(ids.size());
  std::vector<int32_t> pos, seq_len, cu_q(1, 0), req_index;
  int max_q = 0, max_seq = 0;
  for (int b = 0; b < B; ++b) {
    const int len = table_.seq_len(reqs[static_cast<size_t>(b)]);
    const int ql = q_lens[static_cast<size_t>(b)];
    for (int i = 0; i < ql; ++i) pos.push_back(len - ql + i);
    seq_len.push_back(len);
    cu_q.push_back(cu_q.back() + ql);
    req_index.push_back(reqs[static_cast<size_t>(b)]);
    max_q = std::max(max_q, ql);
    max_seq = std::max(max_seq, len);
  }
  const bool decode = max_q == 1;

  Scratch& s = *s_;
  // The rank's sizes (TpShard); the whole model's when tp = 1.
  const TpShard& shard = model_.shard();
  const int64_t H = c.hidden_size, I = shard.inter;
  const int64_t QD = static_cast<int64_t>(shard.q_heads) * c.head_dim;
  const int64_t KVD = 2ll * shard.kv_heads * c.head_dim;
  auto f32 = [](int64_t n) { return static_cast<size_t>(n) * sizeof(float); };
  auto i32 = [](int64_t n) { return static_cast<size_t>(n) * sizeof(int32_t); };
  auto b16 = [](int64_t n) { return static_cast<size_t>(n) * sizeof(uint16_t); };
  s.ids.ensure(backend_, i32(T));
  s.pos.ensure(backend_, i32(T));
  s.slots.ensure(backend_, i32(T));
  s.seq_len.ensure(backend_, i32(B));
  s.req_index.ensure(backend_, i32(B));
  s.cu_q.ensure(backend_, i32(B + 1));
  s.x.ensure(backend_, f32(T * H));
  s.h.ensure(backend_, f32(T * H));
  s.a.ensure(backend_, f32(T * H));
  s.qkv.ensure(backend_, f32(T * (QD + KVD)));
  s.q16.ensure(backend_, b16(T * QD));
  s.kv16.ensure(backend_, b16(T * KVD));
  s.q8.ensure(backend_, static_cast<size_t>(T * QD));
  s.q_scale.ensure(backend_, f32(static_cast<int64_t>(B) * shard.kv_heads));
  s.o16.ensure(backend_, b16(T * QD));
  if (!shadows_.empty()) s.o16_shadow.ensure(backend_, b16(T * QD));
  s.o.ensure(backend_, f32(T * QD));
  s.gu.ensure(backend_, f32(T * 2 * I));
  s.mlp.ensure(backend_, f32(T * I));
  if (bf16_gemm_inputs()) s.x16.ensure(backend_, b16(T * std::max(H, I)));
  s.amax.ensure(backend_, f32(3 * shard.kv_heads));

  s.ids.upload(ids.data(), i32(T));
  s.pos.upload(pos.data(), i32(T));
  s.slots.upload(slots.data(), i32(T));
  s.seq_len.upload(seq_len.data(), i32(B));
  s.req_index.upload(req_index.data(), i32(B));
  s.cu_q.upload(cu_q.data(), i32(B + 1));
  s.T = T;
  s.B = B;
  s.batch = AttentionBatch{};
  s.batch.num_requests = B;
  s.batch.seq_len = s.seq_len.as<const int32_t>();
  s.batch.cu_seqlens_q = s.cu_q.as<const int32_t>();
  s.batch.req_index = s.req_index.as<const int32_t>();
  s.batch.req_to_token = table_.device_table();
  s.batch.max_requests = table_.max_requests();
  s.batch.max_len = table_.max_len();
  s.batch.total_q = T;
  s.batch.max_q_len = max_q;
  s.batch.max_seq_len = max_seq;
  // Pages keep every 64-key tile in consecutive slots (the loose slots of a nearly full pool
  // aside): the decode plan's word for it (AttentionBatch::slots_in_pages).
  s.batch.slots_in_pages = table_.slot_policy() == SlotPolicy::kPages;
  if (decode) {
    // Longest first, once a step for every layer: a batch of mixed lengths ends evenly.
    const std::vector<int32_t> order = decode_order_longest_first(seq_len.data(), B);
    s.order.ensure(backend_, i32(B));
    s.order.upload(order.data(), i32(B));
    s.batch.decode_order = s.order.as<const int32_t>();
  }

  // The logit rows' indices and the outputs, uploaded and allocated before the device work
  // (a recorded step reads them from the same buffers).
  std::vector<int32_t> row_idx;
  if (rows == LogitRows::kLast) {
    for (int b = 0; b < B; ++b) row_idx.push_back(cu_q[static_cast<size_t>(b) + 1] - 1);
  } else if (rows == LogitRows::kAll) {
    row_idx.resize(static_cast<size_t>(T));
    std::iota(row_idx.begin(), row_idx.end(), 0);
  }
  const int64_t R = static_cast<int64_t>(row_idx.size());
  if (R > 0) {
    s.rows.ensure(backend_, i32(R));
    s.rows.upload(row_idx.data(), i32(R));
    s.logits.ensure(backend_, f32(R * c.vocab_size));
    if (greedy) s.next.ensure(backend_, i32(R));
  }
  if (decode && options_.cuda_graph && graph_step(R, greedy)) return R;
  queue_step(decode, R, greedy);
  return R;
}

void ModelRunner::queue_step(bool decode, int64_t R, bool greedy) {
  const ModelConfig& c = model_.config();
  Scratch& s = *s_;
  const int64_t H = c.hidden_size, V = c.vocab_size;
  ops_.embedding(s.ids.as<const int32_t>(), model_.embed(), s.x.as<float>(), s.T, H);
  for (int l = 0; l < c.num_layers; ++l) run_layer(l, decode);
  // The last layer's residual (bf16_gemm_inputs: each layer leaves its down_proj output to the
  // next one's norm).
  if (bf16_gemm_inputs()) ops_.add(s.x.as<float>(), s.a.as<const float>(), s.T * H);
  if (R == 0) return;
  ops_.gather_rows(s.x.as<const float>(), s.rows.as<const int32_t>(), s.h.as<float>(), R, H);
  ops_.rms_norm(s.h.as<const float>(), model_.final_norm(), s.a.as<float>(), R, static_cast<int>(H),
                c.rms_norm_eps);
  ops_.linear(s.a.as<const float>(), model_.lm_head(), nullptr, s.logits.as<float>(), R, V, H);
  if (greedy) ops_.argmax(s.logits.as<const float>(), s.next.as<int32_t>(), R, V);
}

bool ModelRunner::graph_step(int64_t R, bool greedy) {
  StepGraphs& g = *graphs_;
  Scratch& s = *s_;
  auto say_once = [&g](const std::string& what) {
    if (g.said) return;
    g.said = true;
    std::fprintf(stderr, "fp8kv: --cuda-graph: %s\n", what.c_str());
  };
  if (!g.checked) {
    g.checked = true;
    if (options_.observer) {
      g.blocker = "calibration reads each layer's K/V abs-max back on the host";
    } else if (options_.record_q_amax) {
      g.blocker = "record_q_amax reads each layer's Q abs-max back on the host";
    } else if (!shadows_.empty()) {
      g.blocker = "the shadow schemes compare each layer's output on the host";
    } else if (model_.shard().tp > 1) {
      g.blocker = "tensor parallelism (the all-reduces go through the communicator)";
    } else {
      g.blocker = backend_.capture_unsupported();
    }
  }
  if (!g.blocker.empty()) {
    say_once("decode steps run eagerly: " + g.blocker);
    return false;
  }

  // The key: what the step's launches depend on besides the (fixed) buffers.
  StepGraphs::Key key;
  key.B = s.B;
  key.R = R;
  key.greedy = greedy;
  const ModelConfig& c = model_.config();
  key.decode.reserve(static_cast<size_t>(c.num_layers));
  for (int l = 0; l < c.num_layers; ++l) {
    key.decode.push_back(backend_.decode_launch_key(attention_shape(pool_.layer(l))));
  }
  auto it = std::find_if(g.entries.begin(), g.entries.end(),
                         [&](const StepGraphs::Entry& e) { return e.key == key; });
  if (it == g.entries.end()) {
    if (g.entries.size() >= kMaxStepGraphs) {
      g.entries.erase(std::min_element(g.entries.begin(), g.entries.end(),
                                       [](const StepGraphs::Entry& a, const StepGraphs::Entry& b) {
                                         return a.last_use < b.last_use;
                                       }));
    }
    g.entries.push_back(StepGraphs::Entry{});
    it = g.entries.end() - 1;
    it->key = std::move(key);
  }
  StepGraphs::Entry& e = *it;
  e.last_use = ++g.clock;
  const StepGraphs::Epoch epoch{backend_.memory_epoch(), ops_.memory_epoch()};
  auto eager = [&] {
    queue_step(true, R, greedy);
    ++graph_stats_.eager_decode;
  };
  if (e.failed) {
    eager();
    return true;
  }
  if (e.graph && e.epoch == epoch) {
    e.graph->launch();
    ++graph_stats_.replays;
    return true;
  }
  e.graph.reset();
  if (!e.warm || e.warm_epoch != epoch) {
    // The warm-up: every allocation of this key happens here, eagerly.
    eager();
    e.warm = true;
    e.warm_epoch = {backend_.memory_epoch(), ops_.memory_epoch()};
    return true;
  }
  std::string why;
  std::unique_ptr<StepGraph> graph;
  try {
    backend_.begin_capture();
    try {
      queue_step(true, R, greedy);
    } catch (const std::exception& ex) {
      why = ex.what();
    }
    std::string end_why;
    graph = backend_.end_capture(&end_why);
    if (why.empty() && !graph) why = end_why;
    if (!why.empty()) graph.reset();
  } catch (const std::exception& ex) {  // begin_capture refused
    why = ex.what();
  }
  if (!graph) {
    // Nothing recorded ran: the step runs eagerly (an argument error is thrown again there).
    e.failed = true;
    ++graph_stats_.failed;
    say_once("recording a decode step (batch " + std::to_string(s.B) +
             ") failed; steps of its launch configuration run eagerly: " + why);
    eager();
    return true;
  }
  e.graph = std::move(graph);
  e.epoch = epoch;
  ++graph_stats_.captures;
  e.graph->launch();
  ++graph_stats_.replays;
  return true;
}

bool ModelRunner::bf16_gemm_inputs() const {
  return ops_.bf16_gemm_inputs() && model_.weight_dtype() == WeightDtype::kBf16 &&
         !options_.exact_tp;
}

void ModelRunner::run_layer(int l, bool decode) {
  const ModelConfig& c = model_.config();
  const LayerWeights& w = model_.layer(l);
  Scratch& s = *s_;
  const int64_t T = s.T;
  // The rank's heads and intermediate rows (TpShard); the whole model's when tp = 1.
  const TpShard& shard = model_.shard();
  const int64_t H = c.hidden_size, I = shard.inter;
  const int Hq = shard.q_heads, Hkv = shard.kv_heads, D = c.head_dim;
  const int64_t QD = static_cast<int64_t>(Hq) * D;
  const int64_t KVD = 2ll * Hkv * D;
  const int64_t QKVD = QD + KVD;

  // exact_tp: every linear in one fixed order. The column-parallel ones (k = hidden, whole on
  // every rank) in a fixed number of runs; the row-parallel ones (o_proj, down_proj) in this
  // rank's share of the model's runs, so that the all-reduce's rank-order tree completes the
  // tp = 1 tree.
  const int col_chunks = ordered_chunks(H, kMaxOrderedChunks);
  const int model_chunks = exact_tp_chunks(c);
  const int row_chunks = model_chunks % shard.tp == 0 ? model_chunks / shard.tp : 1;
  auto linear = [&](const float* x, WeightView wv, const float* bias, float* y, int64_t n,
                    int64_t k, int chunks) {
    if (options_.exact_tp) {
      ops_.linear_ordered(x, wv, bias, y, T, n, k, chunks);
    } else {
      ops_.linear(x, wv, bias, y, T, n, k);
    }
  };

  // bf16_gemm_inputs(): the GEMMs' inputs are made in bf16 by the ops that produce them (the
  // norms, silu_mul, the attention's own bf16 output) and go to linear_bf16: the bits of linear's
  // rounding, without its rounding kernels and o's widening; the residual adds go into the next
  // norm (seven kernels fewer per layer).
  const bool x16 = bf16_gemm_inputs();
  uint16_t* const h16 = s.x16.as<uint16_t>();
  if (x16) {
    // The previous layer's down_proj output is added to the residual here, with this layer's
    // norm (after the last layer by queue_step).
    if (l == 0) {
      ops_.rms_norm_bf16(s.x.as<const float>(), w.attn_norm.as<const float>(), h16, T,
                         static_cast<int>(H), c.rms_norm_eps);
    } else {
      ops_.add_rms_norm_bf16(s.x.as<float>(), s.a.as<const float>(), w.attn_norm.as<const float>(),
                             h16, T, static_cast<int>(H), c.rms_norm_eps);
    }
    ops_.linear_bf16(h16, w.view(w.w_qkv), w.b_qkv.as<const float>(), s.qkv.as<float>(), T, QKVD,
                     H);
  } else {
    ops_.rms_norm(s.x.as<const float>(), w.attn_norm.as<const float>(), s.h.as<float>(), T,
                  static_cast<int>(H), c.rms_norm_eps);
    // One QKV GEMM under exact_tp too: linear_ordered sums each output element in one order
    // whatever n, so its Q and KV columns have the bits of two GEMMs; and under tensor
    // parallelism w_qkv holds this rank's Q, K and V rows only (Model::load).
    linear(s.h.as<const float>(), w.view(w.w_qkv), w.b_qkv.as<const float>(), s.qkv.as<float>(),
           QKVD, H, col_chunks);
  }
  // RoPE on Q and on the K half of each token's KV columns (V is not rotated), read in place
  // from the QKV rows and written as the dense bf16 Q and KV rows that the KV write, quantize_q
  // and the attention read (none of them takes a row stride).
  ops_.rope_qkv_bf16(s.qkv.as<const float>(), T, Hq, Hkv, D, s.q16.as<uint16_t>(),
                     s.kv16.as<uint16_t>(), s.pos.as<const int32_t>(), model_.inv_freq());

  // Attention into the main pool, with the hooks: calibration observes the K/V written, eval
  // runs its shadow schemes on the same inputs and accounts their error.
  const int row_width = 2 * kv_scales_per_layer(options_.scheme, Hkv);
  float* amax = begin_observation(l);
  float* q_amax = nullptr;
  if (amax != nullptr && options_.observer->config().q_scales) {
    q_amax = amax + 2 * Hkv;
  } else if (options_.record_q_amax && fp8_q(pool_.layer(l).scheme)) {
    backend_.memset(s.amax.get(), 0, static_cast<size_t>(Hkv) * sizeof(float));
    q_amax = s.amax.as<float>();
  }
  attend(l, decode, pool_.layer(l), kv_scales_, row_width, q_scales_, amax, q_amax,
         s.o16.as<uint16_t>());
  end_observation(l, amax);
  if (q_amax != nullptr && amax == nullptr) {
    std::vector<float> host(static_cast<size_t>(Hkv));
    backend_.synchronize();
    s.amax.download(host.data(), host.size() * sizeof(float));
    q_amax_.resize(static_cast<size_t>(c.num_layers) * Hkv, 0.0f);
    float* row = q_amax_.data() + static_cast<size_t>(l) * Hkv;
    for (int g = 0; g < Hkv; ++g) {
      row[g] = std::isnan(row[g]) || std::isnan(host[g]) ? std::numeric_limits<float>::quiet_NaN()
                                                         : std::max(row[g], host[g]);
    }
  }
  run_shadows(l, decode);

  // o_proj over the rank's heads: a partial sum of the output, summed over ranks (o_proj has
  // no bias, so nothing is added twice), then the residual once.
  if (x16) {
    ops_.linear_bf16(s.o16.as<const uint16_t>(), w.view(w.w_o), nullptr, s.a.as<float>(), T, H, QD);
  } else {
    ops_.from_bf16(s.o16.as<const uint16_t>(), s.o.as<float>(), T * QD);
    linear(s.o.as<const float>(), w.view(w.w_o), nullptr, s.a.as<float>(), H, QD, row_chunks);
  }
  all_reduce_sum(s.a, T * H);
  // down_proj over the rank's intermediate rows: partial sums again (no bias).
  if (x16) {
    ops_.add_rms_norm_bf16(s.x.as<float>(), s.a.as<const float>(), w.mlp_norm.as<const float>(),
                           h16, T, static_cast<int>(H), c.rms_norm_eps);
    ops_.linear_bf16(h16, w.view(w.w_gate_up), nullptr, s.gu.as<float>(), T, 2 * I, H);
    ops_.silu_mul_bf16(s.gu.as<const float>(), h16, T, I);  // gate_up has read h16: reused
    ops_.linear_bf16(h16, w.view(w.w_down), nullptr, s.a.as<float>(), T, H, I);
  } else {
    ops_.add(s.x.as<float>(), s.a.as<const float>(), T * H);
    ops_.rms_norm(s.x.as<const float>(), w.mlp_norm.as<const float>(), s.h.as<float>(), T,
                  static_cast<int>(H), c.rms_norm_eps);
    linear(s.h.as<const float>(), w.view(w.w_gate_up), nullptr, s.gu.as<float>(), 2 * I, H,
           col_chunks);
    ops_.silu_mul(s.gu.as<const float>(), s.mlp.as<float>(), T, I);
    linear(s.mlp.as<const float>(), w.view(w.w_down), nullptr, s.a.as<float>(), H, I, row_chunks);
  }
  all_reduce_sum(s.a, T * H);
  if (!x16) ops_.add(s.x.as<float>(), s.a.as<const float>(), T * H);  // x16: in the next norm
}

void ModelRunner::attend(int l, bool decode, KvCacheLayer cache, const BackendBuffer& kv_scales,
                         int row_width, const BackendBuffer& q_scales, float* observe_amax,
                         float* observe_q_amax, uint16_t* out) {
  const ModelConfig& c = model_.config();
  Scratch& s = *s_;
  const int64_t T = s.T;
  const int Hq = model_.shard().q_heads, Hkv = model_.shard().kv_heads, D = c.head_dim;
  KvLayerScales sc;
  if (has_kv_scales(cache.scheme)) {
    sc.k = kv_scales.as<const float>() + static_cast<int64_t>(l) * row_width;
    sc.v = sc.k + row_width / 2;
  }
  QuantizeKvParams qk;
  qk.kv = s.kv16.as<const uint16_t>();
  qk.slots = s.slots.as<const int32_t>();
  qk.num_tokens = T;
  qk.slots_unchanged = l > 0;  // a step's layers write at the same slots: checked at layer 0
  qk.cache = cache;
  qk.scales = sc;
  qk.observe_amax = observe_amax;
  backend_.quantize_kv(qk);

  AttentionParams ap = attention_shape(cache);
  ap.scales = sc;
  ap.o = out;
  if (fp8_q(cache.scheme) || observe_q_amax != nullptr) {
    // The dynamic Q scale of (request, KV head) is the abs-max over this rank's Q heads of
    // that KV head: with tp <= Hkv that is the whole GQA group (as at tp = 1); with tp > Hkv
    // (replicated KV heads) only the rank's part of it, so Q quantizes differently than at
    // tp = 1 (finer, not worse). Static Q scales (q_calibration) are the same on every rank.
    QuantizeQParams qq;
    qq.q = s.q16.as<const uint16_t>();
    qq.q_fp8 = s.q8.as<uint8_t>();
    qq.q_scale = s.q_scale.as<float>();
    if (!q_scales.empty()) qq.static_scale = q_scales.as<const float>() + l * Hkv;
    // Calibration with Q scales runs this with a bf16 cache only to observe Q's abs-max (its
    // FP8 output goes unused).
    qq.observe_amax = observe_q_amax;
    qq.cu_seqlens_q = s.cu_q.as<const int32_t>();
    qq.num_requests = s.B;
    qq.total_q = T;
    qq.num_q_heads = Hq;
    qq.num_kv_heads = Hkv;
    qq.head_dim = D;
    backend_.quantize_q(qq);
  }
  if (fp8_q(cache.scheme)) {
    ap.q_fp8 = s.q8.as<const uint8_t>();
    ap.q_scale = s.q_scale.as<const float>();
  } else {
    ap.q = s.q16.as<const uint16_t>();
  }
  if (decode) {
    backend_.decode_attention(ap);
  } else {
    backend_.prefill_attention(ap);
  }
}

AttentionParams ModelRunner::attention_shape(KvCacheLayer cache) const {
  AttentionParams ap;
  ap.num_q_heads = model_.shard().q_heads;
  ap.cache = cache;
  ap.batch = s_->batch;
  if (options_.exact_tp) ap.split_kv_heads = model_.config().num_kv_heads;
  return ap;
}

float* ModelRunner::begin_observation(int l) {
  // Calibration: observe this layer's writes until it has its warmup + count passes (warmup
  // passes are recorded too; the observer drops them).
  Observer* obs = options_.observer;
  if (!obs || obs->passes_seen(l) >= obs->config().warmup + obs->config().count) return nullptr;
  const int Hkv = model_.shard().kv_heads;
  backend_.memset(s_->amax.get(), 0, static_cast<size_t>(3 * Hkv) * sizeof(float));
  return s_->amax.as<float>();
}

void ModelRunner::end_observation(int l, const float* amax) {
  if (amax == nullptr) return;
  Scratch& s = *s_;
  const int Hkv = model_.shard().kv_heads;
  const bool q = options_.observer->config().q_scales;
  s.host_amax.resize(static_cast<size_t>((q ? 3 : 2) * Hkv));
  backend_.synchronize();
  s.amax.download(s.host_amax.data(), s.host_amax.size() * sizeof(float));
  options_.observer->record(l, s.host_amax.data(), q ? s.host_amax.data() + 2 * Hkv : nullptr);
}

void ModelRunner::run_shadows(int l, bool decode) {
  Scratch& s = *s_;
  const int64_t QD = static_cast<int64_t>(model_.shard().q_heads) * model_.config().head_dim;
  for (size_t i = 0; i < shadows_.size(); ++i) {
    Shadow& sh = *shadows_[i];
    attend(l, decode, sh.pool.layer(l), sh.kv_scales, sh.row_width, sh.q_scales, nullptr, nullptr,
           s.o16_shadow.as<uint16_t>());
    backend_.synchronize();
    const size_t n = static_cast<size_t>(s.T * QD);
    s.host_o.resize(n);
    s.host_o_shadow.resize(n);
    s.o16.download(s.host_o.data(), n * sizeof(uint16_t));
    s.o16_shadow.download(s.host_o_shadow.data(), n * sizeof(uint16_t));
    const TpShard& shard = model_.shard();
    shadow_stats_[i].add(l, s.host_o.data(), s.host_o_shadow.data(), s.T, shard.q_heads,
                         shard.kv_heads, shard.kv_head_begin, model_.config().head_dim);
  }
}

void ModelRunner::all_reduce_sum(BackendBuffer& buf, int64_t n) {
  if (model_.shard().tp == 1) return;
  // The fast path: NCCL on the device buffer, queued behind the GEMM on the backend's stream.
  if (!options_.exact_tp && backend_.cuda_memory() &&
      options_.comm->all_reduce_sum_cuda(buf.as<float>(), static_cast<size_t>(n),
                                         backend_.cuda_stream())) {
    return;
  }
  // Through the host: threads on the CPU (a copy of [T, H] floats, cheap next to the GEMMs),
  // and exact_tp's gather + rank-order tree.
  s_->host_reduce.resize(static_cast<size_t>(n));
  buf.download(s_->host_reduce.data(), s_->host_reduce.size() * sizeof(float));
  if (options_.exact_tp) {
    // Rank-order tree (left half + right half), the top of the tp = 1 run tree: gathered, so
    // that the order is ours and not the collective's.
    const int tp = model_.shard().tp;
    s_->host_gather.resize(static_cast<size_t>(n) * tp);
    options_.comm->all_gather(s_->host_reduce.data(), s_->host_gather.data(),
                              s_->host_reduce.size());
    for (size_t i = 0; i < s_->host_reduce.size(); ++i) {
      s_->host_reduce[i] = rank_tree(s_->host_gather.data(), s_->host_reduce.size(), 0, tp, i);
    }
  } else {
    options_.comm->all_reduce_sum(s_->host_reduce.data(), s_->host_reduce.size());
  }
  buf.upload(s_->host_reduce.data(), s_->host_reduce.size() * sizeof(float));
}

std::vector<std::vector<int32_t>> ModelRunner::generate(
    const std::vector<std::vector<int32_t>>& prompts, int max_new, float temperature,
    uint64_t seed) {
  const int V = model_.config().vocab_size;
  std::vector<int> reqs;
  std::vector<std::vector<int32_t>> out(prompts.size());
  if (prompts.empty() || max_new <= 0) return out;
  // Release the requests however this ends.
  struct Guard {
    ModelRunner* r;
    std::vector<int>* reqs;
    ~Guard() {
      for (int q : *reqs) r->release(q);
    }
  } guard{this, &reqs};
  for (const auto& p : prompts) {
    if (p.empty()) throw Error("generate: empty prompt");
    reqs.push_back(add_request());
  }
  uint64_t rng = seed;
  auto pick = [&](const float* logits) -> int32_t {
    int best = 0;
    for (int i = 1; i < V; ++i) {
      if (logits[i] > logits[best]) best = i;
    }
    if (temperature <= 0.0f) return best;
    // Sample from softmax(logits / temperature).
    double total = 0.0;
    std::vector<double> p(static_cast<size_t>(V));
    for (int i = 0; i < V; ++i) {
      p[static_cast<size_t>(i)] = std::exp((logits[i] - logits[best]) / temperature);
      total += p[static_cast<size_t>(i)];
    }
    double u = static_cast<double>(splitmix64(rng) >> 11) * 0x1.0p-53 * total;
    for (int i = 0; i < V; ++i) {
      u -= p[static_cast<size_t>(i)];
      if (u <= 0) return i;
    }
    return best;
  };
  std::vector<std::vector<int32_t>> step(prompts.size());
  if (temperature <= 0.0f) {
    // Greedy: the argmax on the device (the same first-largest rule as `pick`), B ids back.
    std::vector<int32_t> next = forward_greedy(reqs, prompts);
    for (int step_i = 0;; ++step_i) {
      for (size_t b = 0; b < prompts.size(); ++b) {
        out[b].push_back(next[b]);
        step[b].assign(1, next[b]);
      }
      if (step_i + 1 >= max_new) break;
      next = forward_greedy(reqs, step);
    }
    return out;
  }
  std::vector<float> logits = forward(reqs, prompts, LogitRows::kLast);
  for (int step_i = 0;; ++step_i) {
    for (size_t b = 0; b < prompts.size(); ++b) {
      const int32_t t = pick(logits.data() + b * static_cast<size_t>(V));
      out[b].push_back(t);
      step[b].assign(1, t);
    }
    if (step_i + 1 >= max_new) break;
    logits = forward(reqs, step, LogitRows::kLast);
  }
  return out;
}

}  // namespace fp8kv
