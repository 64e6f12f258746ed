// The model runner on the tiny random-weight model (made once for the suite).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "fp8kv/backend.h"
#include "fp8kv/calib.h"
#include "fp8kv/error.h"
#include "fp8kv/make_model.h"
#include "fp8kv/model.h"
#include "fp8kv/safetensors.h"
#include "fp8kv/workflows.h"
#include "runtime/bf16_activation_ops.h"
#include "runtime/test_util.h"

namespace fp8kv {
namespace {

// ||a - b|| / ||b||.
double rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  double d = 0, r = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    EXPECT_TRUE(std::isfinite(a[i]) && std::isfinite(b[i])) << i;
    d += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    r += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(d / r);
}

std::vector<int32_t> tokens(int n, int seed, int vocab) {
  std::vector<int32_t> t;
  for (int i = 0; i < n; ++i) t.push_back(static_cast<int32_t>((seed * 7919 + i * 104729) % vocab));
  return t;
}

class ModelRunnerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    make_model(dir_->path() + "/tiny", model_preset("tiny"));
    make_model(dir_->path() + "/qwen2", model_preset("qwen2-tiny"));
    backend_ = make_cpu_backend().release();
    ops_ = make_cpu_model_ops().release();
    tiny_ = Model::load(dir_->path() + "/tiny", *backend_).release();
  }
  static void TearDownTestSuite() {
    delete tiny_;
    delete ops_;
    delete backend_;
    delete dir_;
  }

  static RunnerOptions small(KvScheme scheme = KvScheme::kBf16) {
    RunnerOptions o;
    o.scheme = scheme;
    o.num_slots = 256;
    o.max_requests = 4;
    o.max_len = 64;
    return o;
  }

  // Calibrated scales of the tiny model on a little data.
  static CalibData calibrated(QuantType qt, bool q_scales = false) {
    const int V = tiny_->config().vocab_size;
    const TokenData data = {tokens(24, 1, V), tokens(17, 2, V), tokens(30, 3, V)};
    CalibrateOptions co;
    co.quant_type = qt;
    co.batch_size = 2;
    co.q_scales = q_scales;
    return calibrate(*tiny_, *backend_, *ops_, data, co).data;
  }

  static TempDir* dir_;
  static Backend* backend_;
  static ModelOps* ops_;
  static Model* tiny_;
};

TempDir* ModelRunnerTest::dir_ = nullptr;
Backend* ModelRunnerTest::backend_ = nullptr;
ModelOps* ModelRunnerTest::ops_ = nullptr;
Model* ModelRunnerTest::tiny_ = nullptr;

// The same tokens through prefill (one pass, prefill attention) and token by token (decode
// attention over the cache) give the same logits: RoPE positions, the slot table and both
// attention paths agree.
void expect_prefill_matches_decode(const Model& model, Backend& backend, ModelOps& ops,
                                   RunnerOptions opts) {
  const int V = model.config().vocab_size;
  const std::vector<int32_t> prompt = tokens(13, 5, V);
  ModelRunner a(model, backend, ops, opts);
  const int ra = a.add_request();
  const std::vector<float> all = a.forward({ra}, {prompt}, LogitRows::kAll);
  ASSERT_EQ(all.size(), prompt.size() * V);

  ModelRunner b(model, backend, ops, opts);
  const int rb = b.add_request();
  for (size_t t = 0; t < prompt.size(); ++t) {
    const std::vector<float> step = b.forward({rb}, {{prompt[t]}}, LogitRows::kLast);
    const std::vector<float> ref(all.begin() + static_cast<std::ptrdiff_t>(t * V),
                                 all.begin() + static_cast<std::ptrdiff_t>((t + 1) * V));
    // Only fp32 summation order (GEMM shapes) and the bf16 rounding of Q/K/V that follows
    // from it differ.
    EXPECT_LT(rel_diff(step, ref), 2e-3) << "position " << t;
  }
  EXPECT_EQ(b.seq_len(rb), static_cast<int>(prompt.size()));

  // Chunked prefill: 8 tokens, then 5 over the cached prefix.
  ModelRunner c(model, backend, ops, opts);
  const int rc = c.add_request();
  c.forward({rc}, {std::vector<int32_t>(prompt.begin(), prompt.begin() + 8)}, LogitRows::kNone);
  const std::vector<float> tail =
      c.forward({rc}, {std::vector<int32_t>(prompt.begin() + 8, prompt.end())}, LogitRows::kAll);
  EXPECT_LT(rel_diff(tail, std::vector<float>(all.begin() + 8 * V, all.end())), 2e-3);
}

// bf16 GEMM inputs made by the runner's ops (ModelOps::bf16_gemm_inputs: rms_norm_bf16,
// silu_mul_bf16, o_proj on the attention's bf16 output, linear_bf16) against linear rounding
// its fp32 x itself: the rounding moves, the arithmetic does not, so prefill and decode logits
// keep their bits (bf16 weights; the Qwen2 preset adds the q/kv biases; a bf16 and an FP8 cache).
TEST_F(ModelRunnerTest, Bf16GemmInputsKeepTheLogitsBits) {
  for (const char* preset : {"tiny", "qwen2"}) {
    auto model = Model::load(dir_->path() + "/" + preset, *backend_, false, WeightDtype::kBf16);
    const int V = model->config().vocab_size;
    for (KvScheme scheme : {KvScheme::kBf16, KvScheme::kFp8E5m2}) {
      auto logits = [&](bool bf16_inputs) {
        Bf16ActivationCpuOps ops(bf16_inputs);
        ModelRunner r(*model, *backend_, ops, small(scheme));
        const std::vector<int> reqs = {r.add_request(), r.add_request()};
        std::vector<float> all =
            r.forward(reqs, {tokens(11, 1, V), tokens(4, 2, V)}, LogitRows::kAll);
        for (int s = 0; s < 3; ++s) {
          const std::vector<float> l =
              r.forward(reqs, {{(s * 37) % V}, {(s * 53 + 1) % V}}, LogitRows::kLast);
          all.insert(all.end(), l.begin(), l.end());
        }
        // Four passes, four GEMMs per layer (qkv, o, gate_up, down) on bf16 inputs, or none.
        EXPECT_EQ(ops.bf16_linears, bf16_inputs ? 4 * 4 * model->config().num_layers : 0);
        return all;
      };
      const std::vector<float> moved = logits(true), in_linear = logits(false);
      ASSERT_EQ(moved.size(), in_linear.size());
      int64_t differ = 0;
      for (size_t i = 0; i < moved.size(); ++i) {
        differ += std::memcmp(&moved[i], &in_linear[i], sizeof(float)) != 0;
      }
      EXPECT_EQ(differ, 0) << preset << " " << scheme_name(scheme);
    }
  }
}

// The ops of `inner`, counting the QKV projections (a linear of any form on a layer's w_qkv) and
// the other linears. With `split`, a QKV projection runs as the runner ran it before the merge:
// one GEMM on the q_proj rows into [m, QD], one on the k_proj and v_proj rows into [m, KVD], the
// two stitched into y [m, QD + KVD].
class SplitQkvOps final : public ModelOps {
 public:
  SplitQkvOps(ModelOps& inner, const Model& model, bool split)
      : in_(inner), model_(model), split_(split) {
    const ModelConfig& c = model.config();
    qd_ = static_cast<int64_t>(model.shard().q_heads) * c.head_dim;
    kvd_ = 2ll * model.shard().kv_heads * c.head_dim;
  }
  int64_t merged_calls = 0;  // QKV projections seen
  int64_t other_calls = 0;   // other linears

  bool bf16_gemm_inputs() const override { return in_.bf16_gemm_inputs(); }
  void linear(const float* x, WeightView w, const float* bias, float* y, int64_t m, int64_t n,
              int64_t k) override {
    split(w, bias, y, m, n, k, [&](WeightView ws, const float* bs, float* ys, int64_t ns) {
      in_.linear(x, ws, bs, ys, m, ns, k);
    });
  }
  void linear_ordered(const float* x, WeightView w, const float* bias, float* y, int64_t m,
                      int64_t n, int64_t k, int chunks) override {
    split(w, bias, y, m, n, k, [&](WeightView ws, const float* bs, float* ys, int64_t ns) {
      in_.linear_ordered(x, ws, bs, ys, m, ns, k, chunks);
    });
  }
  void linear_bf16(const uint16_t* x16, WeightView w, const float* bias, float* y, int64_t m,
                   int64_t n, int64_t k) override {
    split(w, bias, y, m, n, k, [&](WeightView ws, const float* bs, float* ys, int64_t ns) {
      in_.linear_bf16(x16, ws, bs, ys, m, ns, k);
    });
  }
  void rms_norm(const float* x, const float* w, float* y, int64_t rows, int dim,
                float eps) override {
    in_.rms_norm(x, w, y, rows, dim, eps);
  }
  void rms_norm_bf16(const float* x, const float* w, uint16_t* y16, int64_t rows, int dim,
                     float eps) override {
    in_.rms_norm_bf16(x, w, y16, rows, dim, eps);
  }
  void silu_mul_bf16(const float* gate_up, uint16_t* out16, int64_t rows, int64_t inter) override {
    in_.silu_mul_bf16(gate_up, out16, rows, inter);
  }
  void add_rms_norm_bf16(float* x, const float* a, const float* w, uint16_t* y16, int64_t rows,
                         int dim, float eps) override {
    in_.add_rms_norm_bf16(x, a, w, y16, rows, dim, eps);
  }
  void rope_bf16(const float* x, int64_t x_stride, uint16_t* y16, int64_t rows, int64_t width,
                 int heads, int head_dim, const int32_t* positions,
                 const float* inv_freq) override {
    in_.rope_bf16(x, x_stride, y16, rows, width, heads, head_dim, positions, inv_freq);
  }
  void rope(float* x, int64_t rows, int64_t row_stride, int heads, int head_dim,
            const int32_t* positions, const float* inv_freq) override {
    in_.rope(x, rows, row_stride, heads, head_dim, positions, inv_freq);
  }
  void silu_mul(const float* gate_up, float* out, int64_t rows, int64_t inter) override {
    in_.silu_mul(gate_up, out, rows, inter);
  }
  void embedding(const int32_t* ids, WeightView table, float* out, int64_t tokens,
                 int64_t dim) override {
    in_.embedding(ids, table, out, tokens, dim);
  }
  void gather_rows(const float* src, const int32_t* rows, float* out, int64_t n,
                   int64_t dim) override {
    in_.gather_rows(src, rows, out, n, dim);
  }
  void add(float* y, const float* x, int64_t n) override { in_.add(y, x, n); }
  void to_bf16(const float* x, uint16_t* y, int64_t n) override { in_.to_bf16(x, y, n); }
  void from_bf16(const uint16_t* x, float* y, int64_t n) override { in_.from_bf16(x, y, n); }
  void argmax(const float* logits, int32_t* out, int64_t rows, int64_t vocab) override {
    in_.argmax(logits, out, rows, vocab);
  }

 private:
  using Gemm = std::function<void(WeightView, const float*, float*, int64_t)>;
  void split(WeightView w, const float* bias, float* y, int64_t m, int64_t n, int64_t k,
             const Gemm& gemm) {
    bool qkv = false;
    for (int l = 0; l < model_.config().num_layers; ++l) {
      qkv |= w.data == model_.layer(l).w_qkv.get();
    }
    other_calls += !qkv;
    merged_calls += qkv;
    if (qkv) {
      EXPECT_EQ(n, qd_ + kvd_);
    }
    if (!qkv || !split_) {
      gemm(w, bias, y, n);
      return;
    }
    const size_t elem = w.dtype == WeightDtype::kBf16 ? sizeof(uint16_t) : sizeof(float);
    const WeightView wq = w, wkv{static_cast<const uint8_t*>(w.data) + qd_ * k * elem, w.dtype};
    std::vector<float> yq(static_cast<size_t>(m * qd_)), ykv(static_cast<size_t>(m * kvd_));
    gemm(wq, bias, yq.data(), qd_);
    gemm(wkv, bias ? bias + qd_ : nullptr, ykv.data(), kvd_);
    for (int64_t r = 0; r < m; ++r) {
      std::copy_n(yq.begin() + r * qd_, qd_, y + r * n);
      std::copy_n(ykv.begin() + r * kvd_, kvd_, y + r * n + qd_);
    }
  }

  ModelOps& in_;
  const Model& model_;
  const bool split_;
  int64_t qd_ = 0, kvd_ = 0;
};

// The merged QKV projection (w_qkv, one GEMM per layer) against the separate Q and KV GEMMs
// the runner ran before (SplitQkvOps): each output column is the same dot product over the same
// k. Where the products are exact in fp32 (bf16 weights times bf16 inputs: the CUDA ops'
// arithmetic, Bf16ActivationCpuOps on the bf16-input path, linear_bf16) and under exact_tp
// (linear_ordered: one order per element whatever n), the logits of prefill and decode keep
// their bits, with and without the Qwen2 q/k/v biases, with a bf16 and an FP8 cache. The plain
// CPU ops on fp32 weights and activations are held to a bound instead: OpenBLAS picks its
// kernels and blocking by the GEMM's shape, and at another n some outputs of a prefill-sized
// GEMM round differently (an ulp of an inexact fp32 sum); the bf16 rounding of Q/K/V that follows
// turns some of those into a bf16 ulp, as the different shapes of prefill and decode do
// (PrefillLogitsMatchStepByStepDecode, the same bound).
TEST_F(ModelRunnerTest, MergedQkvProjectionKeepsTheLogitsBits) {
  struct Case {
    const char* preset;
    WeightDtype weights;
    bool cpu_ops;      // the plain CPU ops (fp32 x into the GEMMs), else Bf16ActivationCpuOps
    bool bf16_inputs;  // Bf16ActivationCpuOps asks for bf16 GEMM inputs
    bool exact_tp;
  };
  for (const Case& cs : {Case{"tiny", WeightDtype::kF32, true, false, false},
                         Case{"qwen2", WeightDtype::kF32, true, false, true},
                         Case{"tiny", WeightDtype::kBf16, false, true, false},
                         Case{"qwen2", WeightDtype::kBf16, false, true, false},
                         Case{"qwen2", WeightDtype::kBf16, false, false, true}}) {
    auto model = Model::load(dir_->path() + "/" + cs.preset, *backend_, false, cs.weights);
    const ModelConfig& c = model->config();
    const int V = c.vocab_size;
    // An FP8 cache once (what it adds is the KV write's rounding of the K/V columns).
    const std::vector<KvScheme> schemes =
        cs.bf16_inputs && cs.preset == std::string("tiny")
            ? std::vector<KvScheme>{KvScheme::kBf16, KvScheme::kFp8E5m2}
            : std::vector<KvScheme>{KvScheme::kBf16};
    for (KvScheme scheme : schemes) {
      const std::string what = std::string(cs.preset) + " " + weight_dtype_name(cs.weights) +
                               (cs.cpu_ops ? " cpu ops" : " bf16 activations") +
                               (cs.bf16_inputs ? " bf16 inputs" : "") +
                               (cs.exact_tp ? " exact_tp" : "") + " " + scheme_name(scheme);
      auto logits = [&](bool split) {
        Bf16ActivationCpuOps bf16_ops(cs.bf16_inputs);
        SplitQkvOps ops(cs.cpu_ops ? *ops_ : static_cast<ModelOps&>(bf16_ops), *model, split);
        RunnerOptions o = small(scheme);
        o.exact_tp = cs.exact_tp;
        ModelRunner r(*model, *backend_, ops, o);
        const std::vector<int> reqs = {r.add_request(), r.add_request()};
        // A prompt whose fp32 GEMMs do round differently at the merged n (see above).
        std::vector<int32_t> prompt;
        for (int t = 0; t < 20; ++t) prompt.push_back((t * 7919) % V);
        std::vector<float> all = r.forward(reqs, {prompt, tokens(4, 2, V)}, LogitRows::kAll);
        for (int s = 0; s < 3; ++s) {
          const std::vector<float> l =
              r.forward(reqs, {{(s * 37) % V}, {(s * 53 + 1) % V}}, LogitRows::kLast);
          all.insert(all.end(), l.begin(), l.end());
        }
        // Four passes: one QKV projection per layer, then o, gate_up and down, and the LM head.
        EXPECT_EQ(ops.merged_calls, 4 * c.num_layers) << what;
        EXPECT_EQ(ops.other_calls, 4 * (3 * c.num_layers + 1)) << what;
        if (!split) {
          EXPECT_EQ(bf16_ops.bf16_linears, cs.bf16_inputs ? 4 * 4 * c.num_layers : 0) << what;
        }
        return all;
      };
      const std::vector<float> merged = logits(false), split = logits(true);
      ASSERT_EQ(merged.size(), split.size()) << what;
      int64_t differ = 0;
      for (size_t i = 0; i < merged.size(); ++i) {
        EXPECT_TRUE(std::isfinite(merged[i])) << what << " " << i;
        differ += std::memcmp(&merged[i], &split[i], sizeof(float)) != 0;
      }
      if (cs.cpu_ops && !cs.exact_tp) {
        EXPECT_LT(rel_diff(merged, split), 2e-3) << what;  // see above
      } else {
        EXPECT_EQ(differ, 0) << what;
      }
    }
  }
}

// rope_bf16 on a column range of wider rows (the Q and the KV part of the QKV projection's rows,
// as the runner reads them) gives the bits of rope on the part copied out dense, then to_bf16;
// the input is left alone; a width that does not fit, an odd width, or too many heads are refused.
TEST_F(ModelRunnerTest, RopeBf16ReadsColumnsOfWiderRows) {
  const int D = 64, q_heads = 8, kv_heads = 2, rows = 5;
  const int64_t qd = q_heads * D, kvd = 2 * kv_heads * D, stride = qd + kvd;
  std::vector<float> x(static_cast<size_t>(rows * stride));
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>((i * 7919) % 1000) / 250.0f - 2;
  const std::vector<float> x0 = x;
  std::vector<int32_t> pos = {0, 1, 17, 4095, 131071};
  std::vector<float> inv_freq(D / 2);
  for (int i = 0; i < D / 2; ++i) inv_freq[static_cast<size_t>(i)] = std::pow(1e4f, -2.0f * i / D);
  for (auto [offset, width, heads] : {std::tuple<int64_t, int64_t, int>{0, qd, q_heads},
                                      std::tuple<int64_t, int64_t, int>{qd, kvd, kv_heads}}) {
    std::vector<float> dense(static_cast<size_t>(rows * width));
    for (int64_t r = 0; r < rows; ++r) {
      std::copy_n(x.begin() + r * stride + offset, width, dense.begin() + r * width);
    }
    ops_->rope(dense.data(), rows, width, heads, D, pos.data(), inv_freq.data());
    std::vector<uint16_t> want(dense.size()), got(dense.size());
    ops_->to_bf16(dense.data(), want.data(), static_cast<int64_t>(dense.size()));
    ops_->rope_bf16(x.data() + offset, stride, got.data(), rows, width, heads, D, pos.data(),
                    inv_freq.data());
    EXPECT_EQ(got, want) << "offset " << offset;
    EXPECT_EQ(x, x0) << "offset " << offset << ": x changed";
  }
  std::vector<uint16_t> y(static_cast<size_t>(rows * stride));
  EXPECT_THROW(ops_->rope_bf16(x.data(), 32, y.data(), 1, 64, 1, 32, nullptr, nullptr), Error);
  EXPECT_THROW(ops_->rope_bf16(x.data(), 64, y.data(), 1, 33, 1, 32, nullptr, nullptr), Error);
  EXPECT_THROW(ops_->rope_bf16(x.data(), 64, y.data(), 1, 32, 2, 32, nullptr, nullptr), Error);
}

TEST_F(ModelRunnerTest, PrefillLogitsMatchStepByStepDecode) {
  expect_prefill_matches_decode(*tiny_, *backend_, *ops_, small());
}

TEST_F(ModelRunnerTest, Qwen2BiasAndTiedEmbeddingsPrefillMatchesDecode) {
  auto qwen = Model::load(dir_->path() + "/qwen2", *backend_);
  EXPECT_TRUE(qwen->config().attention_bias);
  EXPECT_TRUE(qwen->config().tie_word_embeddings);
  expect_prefill_matches_decode(*qwen, *backend_, *ops_, small());
}

TEST_F(ModelRunnerTest, BatchOfDifferentLengthsMatchesRequestsAlone) {
  const int V = tiny_->config().vocab_size;
  const auto p1 = tokens(9, 1, V), p2 = tokens(3, 2, V), p3 = tokens(14, 3, V);
  ModelRunner batch(*tiny_, *backend_, *ops_, small());
  const std::vector<int> reqs = {batch.add_request(), batch.add_request(), batch.add_request()};
  const std::vector<float> together = batch.forward(reqs, {p1, p2, p3}, LogitRows::kLast);
  ASSERT_EQ(together.size(), 3u * V);
  int i = 0;
  for (const auto& p : {p1, p2, p3}) {
    ModelRunner alone(*tiny_, *backend_, *ops_, small());
    const std::vector<float> l = alone.forward({alone.add_request()}, {p}, LogitRows::kLast);
    EXPECT_LT(
        rel_diff(l, std::vector<float>(together.begin() + i * V, together.begin() + (i + 1) * V)),
        2e-3)
        << "request " << i;
    ++i;
  }
  // And a batched decode step after the batched prefill.
  const std::vector<float> step = batch.forward(reqs, {{1}, {2}, {3}}, LogitRows::kLast);
  ASSERT_EQ(step.size(), 3u * V);
}

TEST_F(ModelRunnerTest, GenerateIsGreedyOverForward) {
  const int V = tiny_->config().vocab_size;
  const auto prompt = tokens(6, 4, V);
  ModelRunner g(*tiny_, *backend_, *ops_, small());
  const auto out = g.generate({prompt}, 5);
  ASSERT_EQ(out.size(), 1u);
  ASSERT_EQ(out[0].size(), 5u);
  EXPECT_EQ(g.free_slots(), 256);  // requests released

  ModelRunner f(*tiny_, *backend_, *ops_, small());
  const int r = f.add_request();
  std::vector<int32_t> next = prompt;
  for (int i = 0; i < 5; ++i) {
    const std::vector<float> l = f.forward({r}, {next}, LogitRows::kLast);
    std::vector<int32_t> am(1);
    ops_->argmax(l.data(), am.data(), 1, V);
    EXPECT_EQ(am[0], out[0][static_cast<size_t>(i)]) << i;
    next = {am[0]};
  }
}

// RunnerOptions::cuda_graph (--cuda-graph) needs the CUDA backend: the CPU backend refuses it
// at construction and in set_cuda_graph, naming the option; turning it off is always fine and
// leaves the runner working.
TEST_F(ModelRunnerTest, CudaGraphRefusedOnTheCpuBackend) {
  RunnerOptions o = small();
  o.cuda_graph = true;
  const std::string e = error_of([&] { ModelRunner r(*tiny_, *backend_, *ops_, o); });
  EXPECT_NE(e.find("cuda_graph (--cuda-graph)"), std::string::npos) << e;
  EXPECT_NE(e.find("needs the CUDA backend"), std::string::npos) << e;
  EXPECT_NE(e.find("cpu"), std::string::npos) << e;
  ModelRunner r(*tiny_, *backend_, *ops_, small());
  const std::string e2 = error_of([&] { r.set_cuda_graph(true); });
  EXPECT_NE(e2.find("cuda_graph (--cuda-graph)"), std::string::npos) << e2;
  EXPECT_FALSE(r.options().cuda_graph);
  r.set_cuda_graph(false);
  const int V = tiny_->config().vocab_size;
  EXPECT_EQ(r.generate({tokens(5, 1, V)}, 3).at(0).size(), 3u);
  EXPECT_EQ(r.graph_stats().replays, 0);
  // The CPU backend records nothing: begin_capture refuses, end_capture says why.
  EXPECT_FALSE(backend_->capture_unsupported().empty());
  EXPECT_THROW(backend_->begin_capture(), Error);
  std::string why;
  EXPECT_EQ(backend_->end_capture(&why), nullptr);
  EXPECT_EQ(why, backend_->capture_unsupported());
}

// The runner's graph logic (RunnerOptions::cuda_graph) on the CPU: a backend and ops that
// "record" like a CUDA stream capture, wrapping the CPU ones. While recording, every kernel,
// op and memset is stored as a call with its arguments (pointers included) instead of run, and
// anything a capture forbids (upload, download, synchronize, alloc, free) throws; launch()
// replays the stored calls. That is the contract the CUDA graph gives, so a runner that let a
// step's input travel outside the scratch buffers, or replayed a stale recording, gives other
// logits here. decode_launch_key changes every 4 tokens of max_seq_len (the CUDA key changes
// in steps too). The CPU twin sizes a scratch array by batch.max_seq_len, which the CUDA
// kernels only use for their split (part of the key), so the replay passes max_len there.
class RecordingBackend final : public Backend {
 public:
  class Graph final : public StepGraph {
   public:
    explicit Graph(std::vector<std::function<void()>> calls) : calls_(std::move(calls)) {}
    void launch() override {
      for (auto& c : calls_) c();
    }

   private:
    std::vector<std::function<void()>> calls_;
  };

  RecordingBackend() : cpu_(make_cpu_backend()) {}
  bool recording() const { return recording_; }
  int decodes = 0;              // decode_attention calls
  bool slots_in_pages = false;  // the last one's AttentionBatch::slots_in_pages
  // Runs `f` now, or stores it while recording.
  void run(std::function<void()> f) {
    if (recording_) {
      calls_.push_back(std::move(f));
    } else {
      f();
    }
  }
  void forbid(const char* what) const {
    if (recording_) throw Error(std::string("recording: ") + what + " is not allowed");
  }

  std::string name() const override { return "recording-cpu"; }
  void* alloc(size_t bytes) override {
    forbid("alloc");
    return cpu_->alloc(bytes);
  }
  void free(void* ptr) override {
    forbid("free");
    ++epoch_;
    cpu_->free(ptr);
  }
  void upload(void* dst, const void* src, size_t bytes) override {
    forbid("upload");
    cpu_->upload(dst, src, bytes);
  }
  void download(void* dst, const void* src, size_t bytes) override {
    forbid("download");
    cpu_->download(dst, src, bytes);
  }
  void memset(void* dst, int value, size_t bytes) override {
    run([=] { cpu_->memset(dst, value, bytes); });
  }
  void upload_tensors(const std::vector<HostUpload>& u) override {
    forbid("upload_tensors");
    cpu_->upload_tensors(u);
  }
  void synchronize() override { forbid("synchronize"); }
  bool records_graphs() const override { return true; }
  std::string capture_unsupported() const override { return ""; }
  void begin_capture() override {
    recording_ = true;
    calls_.clear();
  }
  std::unique_ptr<StepGraph> end_capture(std::string* why) override {
    recording_ = false;
    (void)why;
    return std::make_unique<Graph>(std::move(calls_));
  }
  uint64_t memory_epoch() const override { return epoch_; }
  uint64_t decode_launch_key(const AttentionParams& p) const override {
    return static_cast<uint64_t>(p.batch.max_seq_len / 4);
  }
  void quantize_kv(const QuantizeKvParams& p) override {
    run([this, p] { cpu_->quantize_kv(p); });
  }
  void quantize_q(const QuantizeQParams& p) override {
    run([this, p] { cpu_->quantize_q(p); });
  }
  void prefill_attention(const AttentionParams& p) override {
    run([this, p] { cpu_->prefill_attention(p); });
  }
  void decode_attention(const AttentionParams& p) override {
    ++decodes;
    slots_in_pages = p.batch.slots_in_pages;
    AttentionParams q = p;
    if (recording_) q.batch.max_seq_len = q.batch.max_len;  // the CPU twin's scratch size
    run([this, q] { cpu_->decode_attention(q); });
  }

 private:
  std::unique_ptr<Backend> cpu_;
  bool recording_ = false;
  std::vector<std::function<void()>> calls_;
  uint64_t epoch_ = 0;
};

// The CPU ops, stored instead of run while the backend records.
class RecordingOps final : public ModelOps {
 public:
  explicit RecordingOps(RecordingBackend& b) : b_(b), cpu_(make_cpu_model_ops()) {}
  void linear(const float* x, WeightView w, const float* bias, float* y, int64_t m, int64_t n,
              int64_t k) override {
    b_.run([=] { cpu_->linear(x, w, bias, y, m, n, k); });
  }
  void linear_ordered(const float* x, WeightView w, const float* bias, float* y, int64_t m,
                      int64_t n, int64_t k, int chunks) override {
    b_.run([=] { cpu_->linear_ordered(x, w, bias, y, m, n, k, chunks); });
  }
  void rms_norm(const float* x, const float* w, float* y, int64_t rows, int dim,
                float eps) override {
    b_.run([=] { cpu_->rms_norm(x, w, y, rows, dim, eps); });
  }
  void linear_bf16(const uint16_t* x16, WeightView w, const float* bias, float* y, int64_t m,
                   int64_t n, int64_t k) override {
    b_.run([=] { cpu_->linear_bf16(x16, w, bias, y, m, n, k); });
  }
  void rms_norm_bf16(const float* x, const float* w, uint16_t* y16, int64_t rows, int dim,
                     float eps) override {
    b_.run([=] { cpu_->rms_norm_bf16(x, w, y16, rows, dim, eps); });
  }
  void silu_mul_bf16(const float* gate_up, uint16_t* out16, int64_t rows, int64_t inter) override {
    b_.run([=] { cpu_->silu_mul_bf16(gate_up, out16, rows, inter); });
  }
  void add_rms_norm_bf16(float* x, const float* a, const float* w, uint16_t* y16, int64_t rows,
                         int dim, float eps) override {
    b_.run([=] { cpu_->add_rms_norm_bf16(x, a, w, y16, rows, dim, eps); });
  }
  void rope_bf16(const float* x, int64_t x_stride, uint16_t* y16, int64_t rows, int64_t width,
                 int heads, int head_dim, const int32_t* positions,
                 const float* inv_freq) override {
    b_.run([=] {
      cpu_->rope_bf16(x, x_stride, y16, rows, width, heads, head_dim, positions, inv_freq);
    });
  }
  void rope(float* x, int64_t rows, int64_t row_stride, int heads, int head_dim,
            const int32_t* positions, const float* inv_freq) override {
    b_.run([=] { cpu_->rope(x, rows, row_stride, heads, head_dim, positions, inv_freq); });
  }
  void silu_mul(const float* gate_up, float* out, int64_t rows, int64_t inter) override {
    b_.run([=] { cpu_->silu_mul(gate_up, out, rows, inter); });
  }
  void embedding(const int32_t* ids, WeightView table, float* out, int64_t tokens,
                 int64_t dim) override {
    b_.run([=] { cpu_->embedding(ids, table, out, tokens, dim); });
  }
  void gather_rows(const float* src, const int32_t* rows, float* out, int64_t n,
                   int64_t dim) override {
    b_.run([=] { cpu_->gather_rows(src, rows, out, n, dim); });
  }
  void add(float* y, const float* x, int64_t n) override {
    b_.run([=] { cpu_->add(y, x, n); });
  }
  void to_bf16(const float* x, uint16_t* y, int64_t n) override {
    b_.run([=] { cpu_->to_bf16(x, y, n); });
  }
  void from_bf16(const uint16_t* x, float* y, int64_t n) override {
    b_.run([=] { cpu_->from_bf16(x, y, n); });
  }
  void argmax(const float* logits, int32_t* out, int64_t rows, int64_t vocab) override {
    b_.run([=] { cpu_->argmax(logits, out, rows, vocab); });
  }
  void prepare_capture() override { ++prepared; }
  int prepared = 0;

 private:
  RecordingBackend& b_;
  std::unique_ptr<ModelOps> cpu_;
};

// Teacher-forced decode steps (kLast), then generate() (device argmax), with and without
// graphs: the same logits and tokens bit for bit; every 4 tokens the decode key changes, so the
// graph run warms up (eager), records, replays, and records again.
TEST_F(ModelRunnerTest, RecordedDecodeStepsGiveTheEagerResults) {
  const int V = tiny_->config().vocab_size;
  auto run = [&](bool graph, GraphStats* forward_stats, GraphStats* stats,
                 std::vector<std::vector<int32_t>>* gen, int* prepared) {
    RecordingBackend backend;
    RecordingOps ops(backend);
    auto model = Model::load(dir_->path() + "/tiny", backend);
    RunnerOptions o = small();
    o.cuda_graph = graph;
    ModelRunner r(*model, backend, ops, o);
    const std::vector<std::vector<int32_t>> prompts = {tokens(9, 1, V), tokens(3, 2, V)};
    const std::vector<int> reqs = {r.add_request(), r.add_request()};
    std::vector<float> all = r.forward(reqs, prompts, LogitRows::kLast);
    for (int s = 0; s < 16; ++s) {
      const std::vector<float> l =
          r.forward(reqs, {{(s * 37) % V}, {(s * 53 + 1) % V}}, LogitRows::kLast);
      all.insert(all.end(), l.begin(), l.end());
    }
    *forward_stats = r.graph_stats();
    for (int q : reqs) r.release(q);
    *gen = r.generate(prompts, 12);
    *stats = r.graph_stats();
    *prepared = ops.prepared;
    return all;
  };
  GraphStats ef, e, gf, g;
  std::vector<std::vector<int32_t>> gen_e, gen_g;
  int prep_e = 0, prep_g = 0;
  const std::vector<float> eager = run(false, &ef, &e, &gen_e, &prep_e);
  const std::vector<float> graph = run(true, &gf, &g, &gen_g, &prep_g);
  ASSERT_EQ(eager.size(), graph.size());
  EXPECT_EQ(std::memcmp(eager.data(), graph.data(), eager.size() * sizeof(float)), 0);
  EXPECT_EQ(gen_e, gen_g);
  EXPECT_EQ(e.replays + e.captures + e.eager_decode, 0);
  EXPECT_EQ(prep_e, 0);
  EXPECT_EQ(prep_g, 1);
  // 16 steps, the longest request at 10..25 tokens: keys 2 (10, 11), 3 (12..15), 4, 5, 6
  // (24, 25). Per key: one eager warm-up, one recording (replayed at once), replays after.
  EXPECT_EQ(gf.failed, 0);
  EXPECT_EQ(gf.captures, 5);
  EXPECT_EQ(gf.eager_decode, 5);
  EXPECT_EQ(gf.replays, 16 - 5);       // the recorded steps included
  EXPECT_GT(g.captures, gf.captures);  // generate's greedy steps are keys of their own
  EXPECT_GT(g.replays, gf.replays);
}

TEST_F(ModelRunnerTest, Fp8WithoutCalibrationRefused) {
  for (KvScheme s : {KvScheme::kFp8PerHead, KvScheme::kFp8PerTensor, KvScheme::kFp8PerHeadBf16Q}) {
    const std::string e = error_of([&] { ModelRunner r(*tiny_, *backend_, *ops_, small(s)); });
    EXPECT_NE(e.find("refusing to run with scales of 1.0"), std::string::npos) << e;
    EXPECT_NE(e.find(scheme_name(s)), std::string::npos) << e;
  }
  // Scales of the other quant type are refused too.
  RunnerOptions o = small(KvScheme::kFp8PerHead);
  o.scales = slice_for_rank(calibrated(QuantType::kPerTensor), 1, 0);
  const std::string e = error_of([&] { ModelRunner r(*tiny_, *backend_, *ops_, o); });
  EXPECT_NE(e.find("per_head"), std::string::npos) << e;
  o.scheme = KvScheme::kFp8PerHeadBf16Q;
  const std::string e2 = error_of([&] { ModelRunner r(*tiny_, *backend_, *ops_, o); });
  EXPECT_NE(e2.find("fp8-per-head-bf16q KV cache needs per_head scales, got per_tensor"),
            std::string::npos)
      << e2;
  // fp8-e5m2 has no scales: given some, it refuses them (they were meant for another cache).
  o.scheme = KvScheme::kFp8E5m2;
  const std::string e3 = error_of([&] { ModelRunner r(*tiny_, *backend_, *ops_, o); });
  EXPECT_NE(e3.find("fp8-e5m2 KV cache takes no calibration file"), std::string::npos) << e3;
  const std::string e4 =
      error_of([&] { load_scales_for_model("unused.json", tiny_->config(), KvScheme::kFp8E5m2); });
  EXPECT_NE(e4.find("fp8-e5m2 KV cache takes no calibration file"), std::string::npos) << e4;
}

// fp8-e5m2 runs with no scales at all; fp8-per-head-bf16q on fp8-per-head's scales. Both track
// the bf16 cache; bf16q differs from fp8-per-head only by keeping Q and P out of e4m3.
TEST_F(ModelRunnerTest, E5m2AndPerHeadBf16QCachesTrackBf16) {
  const int V = tiny_->config().vocab_size;
  const auto prompt = tokens(20, 9, V);
  auto logits = [&](RunnerOptions o) {
    ModelRunner r(*tiny_, *backend_, *ops_, std::move(o));
    const int req = r.add_request();
    std::vector<float> out = r.forward({req}, {prompt}, LogitRows::kAll);
    const std::vector<float> step = r.forward({req}, {{prompt[3]}}, LogitRows::kLast);  // decode
    out.insert(out.end(), step.begin(), step.end());
    return out;
  };
  const std::vector<float> bf16 = logits(small());
  const std::vector<float> e5m2 = logits(small(KvScheme::kFp8E5m2));
  const RankScales ph = slice_for_rank(calibrated(QuantType::kPerHead), 1, 0);
  RunnerOptions o = small(KvScheme::kFp8PerHeadBf16Q);
  o.scales = ph;
  const std::vector<float> bf16q = logits(o);
  o.scheme = KvScheme::kFp8PerHead;
  const std::vector<float> head = logits(o);
  for (const auto* x : {&e5m2, &bf16q, &head}) {
    EXPECT_GT(rel_diff(*x, bf16), 0.0);
    EXPECT_LT(rel_diff(*x, bf16), 0.25);
  }
  EXPECT_GT(rel_diff(bf16q, head), 0.0);
}

// The slot policy and the order in which a context's slots are taken place K/V in other slots,
// nothing else: a decode step after a random context reads the same logits, bit for bit, with
// pages or LightLLM's token order, by steps or in runs. A refused context changes nothing.
TEST_F(ModelRunnerTest, SlotPolicyAndContextOrderOnlyPlaceTheSlots) {
  const int V = tiny_->config().vocab_size;
  std::vector<float> first;
  for (SlotPolicy policy : {SlotPolicy::kPages, SlotPolicy::kTokens}) {
    for (bool by_steps : {false, true}) {
      RunnerOptions o = small();
      o.max_len = 200;
      o.num_slots = 3 * 200 + 5;
      o.slot_policy = policy;
      ModelRunner r(*tiny_, *backend_, *ops_, o);
      const std::vector<int> reqs = {r.add_request(), r.add_request(), r.add_request()};
      r.forward(reqs, {tokens(5, 1, V), tokens(64, 2, V), tokens(1, 3, V)}, LogitRows::kNone);
      r.append_random_context(reqs, 120, 9, by_steps);
      EXPECT_EQ(r.free_slots(), o.num_slots - (125 + 184 + 121));
      const std::vector<float> logits = r.forward(reqs, {{4}, {5}, {6}}, LogitRows::kLast);
      if (first.empty()) {
        first = logits;
      } else {
        EXPECT_EQ(logits, first) << (policy == SlotPolicy::kPages ? "pages" : "tokens")
                                 << (by_steps ? ", by steps" : ", in runs");
      }
      // Past max_len (request 1 holds 185): refused before any slot is taken.
      const std::string e = error_of([&] { r.append_random_context(reqs, 16, 9, by_steps); });
      EXPECT_NE(e.find("more than max_len 200"), std::string::npos) << e;
      EXPECT_EQ(r.free_slots(), o.num_slots - (126 + 185 + 122));
      EXPECT_EQ(r.seq_len(reqs[0]), 126);
    }
  }
}

// The runner tells the decode plan whether its slots lie in pages (AttentionBatch::slots_in_pages,
// which steers the CUDA split: decode_split.h): so for SlotPolicy::kPages, not for kTokens.
TEST_F(ModelRunnerTest, DecodeIsToldWhetherTheSlotsLieInPages) {
  const int V = tiny_->config().vocab_size;
  for (SlotPolicy policy : {SlotPolicy::kPages, SlotPolicy::kTokens}) {
    RecordingBackend backend;
    RecordingOps ops(backend);
    auto model = Model::load(dir_->path() + "/tiny", backend);
    RunnerOptions o = small();
    o.slot_policy = policy;
    backend.slots_in_pages = policy != SlotPolicy::kPages;  // the opposite until a decode runs
    ModelRunner r(*model, backend, ops, o);
    const std::vector<int> reqs = {r.add_request(), r.add_request()};
    r.forward(reqs, {tokens(9, 1, V), tokens(3, 2, V)}, LogitRows::kLast);
    r.forward(reqs, {{4}, {5}}, LogitRows::kLast);
    EXPECT_GT(backend.decodes, 0);
    EXPECT_EQ(backend.slots_in_pages, policy == SlotPolicy::kPages)
        << (policy == SlotPolicy::kPages ? "pages" : "tokens");
  }
}

TEST_F(ModelRunnerTest, OutOfSlotsSaysNeededAndFree) {
  const int V = tiny_->config().vocab_size;
  RunnerOptions o = small();
  o.num_slots = 10;
  ModelRunner r(*tiny_, *backend_, *ops_, o);
  const int a = r.add_request();
  const int b = r.add_request();
  r.forward({a}, {tokens(4, 1, V)}, LogitRows::kNone);
  const std::string e = error_of([&] {
    r.forward({a, b}, {tokens(3, 2, V), tokens(5, 3, V)}, LogitRows::kNone);
  });
  EXPECT_NE(e.find("needs 8 new slots"), std::string::npos) << e;
  EXPECT_NE(e.find("6 of 10 are free"), std::string::npos) << e;
  // Nothing changed: the same requests still fit when smaller.
  EXPECT_EQ(r.seq_len(a), 4);
  EXPECT_EQ(r.seq_len(b), 0);
  EXPECT_EQ(r.free_slots(), 6);
  r.forward({a, b}, {tokens(2, 2, V), tokens(4, 3, V)}, LogitRows::kNone);
  EXPECT_EQ(r.free_slots(), 0);
  r.release(a);
  EXPECT_EQ(r.free_slots(), 6);
  EXPECT_NE(error_of([&] { r.forward({b}, {{V}}, LogitRows::kNone); }).find("vocabulary"),
            std::string::npos);
}

TEST_F(ModelRunnerTest, CalibrateWritesAFileLoadCalibAccepts) {
  TempDir dir;
  for (QuantType qt : {QuantType::kPerHead, QuantType::kPerTensor}) {
    const CalibData d = calibrated(qt);
    const std::string path = dir.path() + "/kv_cache_calib.json";
    write_calib(path, d);
    const KvScheme scheme =
        qt == QuantType::kPerHead ? KvScheme::kFp8PerHead : KvScheme::kFp8PerTensor;
    const CalibData back = load_calib(path, calib_expect_for(tiny_->config(), scheme));
    EXPECT_EQ(back.architectures, "LlamaForCausalLM");
    EXPECT_EQ(back.num_layers, 4);
    EXPECT_EQ(back.num_head, 2);
    EXPECT_EQ(back.quant_type, qt);
    EXPECT_EQ(back.scales, d.scales);
    for (float s : back.scales) EXPECT_TRUE(std::isfinite(s) && s > 0 && s != 1.0f) << s;
    if (qt == QuantType::kPerHead) {
      // The strong K outlier channel sits in head l % 2 of layer l: its K scale is the larger.
      for (int l = 0; l < 4; ++l) {
        EXPECT_GT(back.k_scale(l, l % 2), back.k_scale(l, (l + 1) % 2)) << "layer " << l;
      }
    }
    if (qt == QuantType::kPerHead) {
      // fp8-per-tensor refuses a per_head file, naming the field.
      const std::string e =
          error_of([&] { load_scales_for_model(path, tiny_->config(), KvScheme::kFp8PerTensor); });
      EXPECT_NE(e.find("field 'quant_type': expected \"per_tensor\""), std::string::npos) << e;
      continue;
    }
    // The per-head schemes take a per_tensor file, each layer's scale on every KV head.
    for (KvScheme s : {KvScheme::kFp8PerHead, KvScheme::kFp8PerHeadBf16Q}) {
      const RankScales r = load_scales_for_model(path, tiny_->config(), s);
      EXPECT_EQ(r.quant_type, QuantType::kPerHead);
      EXPECT_TRUE(r.broadcast_from_per_tensor);
      ASSERT_EQ(r.heads_per_rank, 2);
      for (int l = 0; l < 4; ++l) {
        for (int h = 0; h < 2; ++h) {
          EXPECT_EQ(r.k_row(l)[h], d.k_scale(l, 0)) << scheme_name(s) << " layer " << l;
          EXPECT_EQ(r.v_row(l)[h], d.v_scale(l, 0)) << scheme_name(s) << " layer " << l;
        }
      }
    }
  }
}

// fp8-per-head-bf16q on a per_tensor file is fp8-per-tensor: the same bytes in the cache (each
// head's scale is the layer's) and the same bf16-Q attention, so the same logits bit for bit
// wherever the two round P alike (fp8_p): decode, and a prefill whose rows have one key (P is 1,
// exact in e4m3 times kPScale). A longer prefill at a head_dim where fp8-per-tensor's kernel
// rounds P to e4m3 (fp8_p: 128 today, not this model's 64) differs from it by that rounding alone:
// less than fp8-per-head, which rounds Q too.
TEST_F(ModelRunnerTest, PerHeadBf16QOnAPerTensorFileIsFp8PerTensor) {
  TempDir dir;
  const std::string path = dir.path() + "/pt.json";
  write_calib(path, calibrated(QuantType::kPerTensor));
  const int V = tiny_->config().vocab_size;
  const int D = tiny_->config().head_dim;
  auto logits = [&](KvScheme scheme, const std::vector<int32_t>& prompt) {
    RunnerOptions o = small(scheme);
    o.scales = load_scales_for_model(path, tiny_->config(), scheme);
    ModelRunner r(*tiny_, *backend_, *ops_, std::move(o));
    const int req = r.add_request();
    std::vector<float> out = r.forward({req}, {prompt}, LogitRows::kAll);
    for (int step = 0; step < 3; ++step) {  // decode
      const std::vector<float> next = r.forward({req}, {{7 + 5 * step}}, LogitRows::kLast);
      out.insert(out.end(), next.begin(), next.end());
    }
    return out;
  };
  auto same_bits = [](const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
  };
  const std::vector<int32_t> one = {9};
  EXPECT_TRUE(
      same_bits(logits(KvScheme::kFp8PerTensor, one), logits(KvScheme::kFp8PerHeadBf16Q, one)));
  const auto prompt = tokens(20, 9, V);
  const std::vector<float> tensor = logits(KvScheme::kFp8PerTensor, prompt);
  const std::vector<float> bf16q = logits(KvScheme::kFp8PerHeadBf16Q, prompt);
  const std::vector<float> head = logits(KvScheme::kFp8PerHead, prompt);
  ASSERT_EQ(tensor.size(), bf16q.size());
  if (fp8_p(KvScheme::kFp8PerTensor, true, D) == fp8_p(KvScheme::kFp8PerHeadBf16Q, true, D)) {
    EXPECT_TRUE(same_bits(tensor, bf16q)) << "head_dim " << D;
  } else {
    EXPECT_GT(rel_diff(tensor, bf16q), 0.0) << "head_dim " << D;
    EXPECT_LT(rel_diff(tensor, bf16q), rel_diff(head, bf16q)) << "head_dim " << D;
  }
  // fp8-per-head on the same file rounds Q and P to e4m3 as well: other logits.
  EXPECT_GT(rel_diff(head, tensor), 0.0);
}

TEST_F(ModelRunnerTest, CalibrationCountFromEnvironmentAndOptions) {
  const int V = tiny_->config().vocab_size;
  const TokenData data = {tokens(8, 1, V), tokens(8, 2, V), tokens(8, 3, V), tokens(8, 4, V)};
  CalibrateOptions co;
  co.batch_size = 1;
  ::setenv("FP8KV_CALIB_COUNT", "2", 1);
  ::setenv("FP8KV_CALIB_WARMUP", "1", 1);
  CalibrateResult r = calibrate(*tiny_, *backend_, *ops_, data, co);
  EXPECT_EQ(r.warmup, 1);
  EXPECT_EQ(r.count, 2);
  EXPECT_EQ(r.passes_run, 3);  // stops once every layer has its count
  // Passes 1 and 2 only: the same scales as calibrating on sequences 1 and 2 alone.
  ::unsetenv("FP8KV_CALIB_WARMUP");
  ::unsetenv("FP8KV_CALIB_COUNT");
  const CalibrateResult only = calibrate(*tiny_, *backend_, *ops_, {data[1], data[2]}, co);
  EXPECT_EQ(only.count, 2);
  EXPECT_EQ(r.data.scales, only.data.scales);
  // Options override the environment; too few passes for the count are refused.
  ::setenv("FP8KV_CALIB_COUNT", "4", 1);
  co.count = 1;
  EXPECT_EQ(calibrate(*tiny_, *backend_, *ops_, data, co).passes_run, 1);
  co.count.reset();
  ::setenv("FP8KV_CALIB_COUNT", "5", 1);
  const std::string e = error_of([&] { calibrate(*tiny_, *backend_, *ops_, data, co); });
  EXPECT_NE(e.find("gives 4 forward passes"), std::string::npos) << e;
  ::setenv("FP8KV_CALIB_COUNT", "many", 1);
  EXPECT_NE(
      error_of([&] { calibrate(*tiny_, *backend_, *ops_, data, co); }).find("FP8KV_CALIB_COUNT"),
      std::string::npos);
  ::unsetenv("FP8KV_CALIB_COUNT");
}

TEST_F(ModelRunnerTest, Fp8CachesTrackBf16AndDoubledScalesChangeTheOutput) {
  const int V = tiny_->config().vocab_size;
  const auto prompt = tokens(20, 9, V);
  ModelRunner ref(*tiny_, *backend_, *ops_, small());
  const std::vector<float> bf16 = ref.forward({ref.add_request()}, {prompt}, LogitRows::kAll);

  TempDir dir;
  for (QuantType qt : {QuantType::kPerTensor, QuantType::kPerHead}) {
    const KvScheme scheme =
        qt == QuantType::kPerHead ? KvScheme::kFp8PerHead : KvScheme::kFp8PerTensor;
    CalibData d = calibrated(qt);
    write_calib(dir.path() + "/real.json", d);
    for (float& s : d.scales) s *= 2.0f;
    write_calib(dir.path() + "/doubled.json", d);

    auto run = [&](const std::string& file) {
      RunnerOptions o = small(scheme);
      o.scales = load_scales_for_model(dir.path() + "/" + file, tiny_->config(), scheme);
      ModelRunner r(*tiny_, *backend_, *ops_, o);
      return r.forward({r.add_request()}, {prompt}, LogitRows::kAll);
    };
    const std::vector<float> real = run("real.json");
    const std::vector<float> doubled = run("doubled.json");
    // FP8 K/V (and Q for per-head) move the logits a little, not a lot.
    const double err = rel_diff(real, bf16);
    EXPECT_GT(err, 0.0) << scheme_name(scheme);
    EXPECT_LT(err, 0.25) << scheme_name(scheme);
    // Twice the scales round K/V onto a different grid: the logits change.
    EXPECT_GT(rel_diff(doubled, real), 1e-4) << scheme_name(scheme);
  }
}

TEST_F(ModelRunnerTest, EvalShadowsRunOnTheSameInputs) {
  const int V = tiny_->config().vocab_size;
  const TokenData data = {tokens(12, 1, V), tokens(7, 2, V), tokens(10, 3, V)};
  const RankScales pt = slice_for_rank(calibrated(QuantType::kPerTensor), 1, 0);
  const RankScales ph = slice_for_rank(calibrated(QuantType::kPerHead), 1, 0);
  EvalOptions eo;
  eo.batch_size = 2;
  const EvalResult r = evaluate(*tiny_, *backend_, *ops_, data, pt, ph, eo);
  ASSERT_EQ(r.schemes.size(), 3u);
  EXPECT_EQ(r.positions, 11 + 6 + 9);
  EXPECT_EQ(r.schemes[0].kl_mean, 0.0);
  EXPECT_EQ(r.schemes[0].top1_agreement, 1.0);
  for (int s = 1; s < 3; ++s) {
    const SchemeEval& e = r.schemes[static_cast<size_t>(s)];
    EXPECT_GT(e.kl_mean, 0.0);
    EXPECT_GE(e.kl_max, e.kl_mean);
    EXPECT_GT(e.perplexity, 1.0);
    ASSERT_EQ(e.attn_rel_error.size(), 4u);
    for (double x : e.attn_rel_error) {
      // E4M3 keeps 3 mantissa bits: a few percent per element, never more than ~30%.
      EXPECT_GT(x, 1e-3);
      EXPECT_LT(x, 0.3);
    }
    // Per (layer, KV head): a layer's error is a ||ref||^2-weighted mean of its heads' squared
    // errors, so it lies between its best and its worst head (1e-12: rounding only).
    const int Hkv = tiny_->config().num_kv_heads;
    ASSERT_EQ(e.num_kv_heads, Hkv);
    ASSERT_EQ(e.head_attn_rel_error.size(), static_cast<size_t>(4 * Hkv));
    for (size_t l = 0; l < 4; ++l) {
      const auto h = e.head_attn_rel_error.begin() + static_cast<std::ptrdiff_t>(l * Hkv);
      const double lo = *std::min_element(h, h + Hkv), hi = *std::max_element(h, h + Hkv);
      EXPECT_GT(lo, 0.0);
      EXPECT_GE(e.attn_rel_error[l], lo * (1 - 1e-12)) << "layer " << l;
      EXPECT_LE(e.attn_rel_error[l], hi * (1 + 1e-12)) << "layer " << l;
    }
  }
  const std::string table = format_eval_table(r);
  EXPECT_NE(table.find("perplexity"), std::string::npos);
  EXPECT_NE(table.find("attn-out rel. error, layer 3"), std::string::npos);
  EXPECT_NE(table.find("worst KV head"), std::string::npos);
}

// fp8-per-head serves with the file's static Q scales when it has them: the logits differ from
// the dynamic ones, and static scales far too small (most of Q saturates at +-448 * s) change
// them by more. calibrate --q-scales refuses per_tensor.
TEST_F(ModelRunnerTest, StaticQScalesAreUsedWhenTheFileHasThem) {
  const CalibData with_q = calibrated(QuantType::kPerHead, true);
  ASSERT_TRUE(with_q.q_scales.has_value());
  for (float s : with_q.q_scales->scales) {
    EXPECT_TRUE(std::isfinite(s) && s > 0.0f) << s;
  }
  const int V = tiny_->config().vocab_size;
  const std::vector<int32_t> prompt = tokens(19, 9, V);
  auto logits = [&](const CalibData& calib, KvScheme scheme = KvScheme::kFp8PerHead) {
    RunnerOptions o = small(scheme);
    o.scales = slice_for_rank(calib, 1, 0);
    ModelRunner runner(*tiny_, *backend_, *ops_, o);
    const int r = runner.add_request();
    std::vector<float> out = runner.forward({r}, {prompt}, LogitRows::kAll);
    const std::vector<float> d = runner.forward({r}, {{7}}, LogitRows::kLast);  // decode
    out.insert(out.end(), d.begin(), d.end());
    return out;
  };
  CalibData dynamic = with_q;
  dynamic.q_scales.reset();
  CalibData small_q = with_q;
  for (float& s : small_q.q_scales->scales) s /= 64.0f;
  const std::vector<float> st = logits(with_q), dy = logits(dynamic), sat = logits(small_q);
  EXPECT_GT(rel_diff(st, dy), 0.0);
  EXPECT_LT(rel_diff(st, dy), 0.25);  // both are FP8 caches of one model
  EXPECT_GT(rel_diff(sat, st), 2 * rel_diff(st, dy));
  // fp8-per-head-bf16q keeps Q in bf16: the file's Q scales change nothing, even tiny ones.
  const std::vector<float> bf16q = logits(dynamic, KvScheme::kFp8PerHeadBf16Q);
  EXPECT_EQ(logits(with_q, KvScheme::kFp8PerHeadBf16Q), bf16q);
  EXPECT_EQ(logits(small_q, KvScheme::kFp8PerHeadBf16Q), bf16q);

  EXPECT_THROW(calibrated(QuantType::kPerTensor, true), Error);
}

// eval with static Q scales: the fp8-per-head column runs dynamic Q, a "per-head static-Q"
// column the file's, with how much of the static range Q used.
TEST_F(ModelRunnerTest, EvalComparesDynamicAndStaticQ) {
  const int V = tiny_->config().vocab_size;
  const TokenData data = {tokens(12, 1, V), tokens(7, 2, V)};
  const RankScales pt = slice_for_rank(calibrated(QuantType::kPerTensor), 1, 0);
  const RankScales ph = slice_for_rank(calibrated(QuantType::kPerHead, true), 1, 0);
  ASSERT_TRUE(ph.q.has_value());
  RankScales ph_dynamic = ph;
  ph_dynamic.q.reset();
  EvalOptions eo;
  eo.batch_size = 2;
  const EvalResult r = evaluate(*tiny_, *backend_, *ops_, data, pt, ph, eo);
  ASSERT_EQ(r.schemes.size(), 4u);
  EXPECT_EQ(r.schemes[2].label, "fp8-per-head");
  EXPECT_EQ(r.schemes[3].label, "per-head static-Q");
  EXPECT_EQ(r.schemes[3].scheme, KvScheme::kFp8PerHead);
  EXPECT_TRUE(r.schemes[2].q_range_use.empty());
  const int L = tiny_->config().num_layers, H = tiny_->config().num_kv_heads;
  ASSERT_EQ(r.schemes[3].q_range_use.size(), static_cast<size_t>(L * H));
  for (double u : r.schemes[3].q_range_use) {
    // Q on other data than the calibration's: near its range, rarely far above or below.
    EXPECT_GT(u, 0.2);
    EXPECT_LT(u, 5.0);
  }
  EXPECT_NE(r.schemes[2].kl_mean, r.schemes[3].kl_mean);
  // The dynamic column is the run without q_calibration.
  const EvalResult d = evaluate(*tiny_, *backend_, *ops_, data, pt, ph_dynamic, eo);
  ASSERT_EQ(d.schemes.size(), 3u);
  EXPECT_EQ(d.schemes[2].kl_mean, r.schemes[2].kl_mean);
  const std::string table = format_eval_table(r);
  EXPECT_NE(table.find("per-head static-Q"), std::string::npos) << table;
  EXPECT_NE(table.find("static range 448 * s"), std::string::npos) << table;
}

// --kv-schemes and static Q together: the static-Q column comes right after fp8-per-head, only
// when fp8-per-head is chosen; fp8-per-head-bf16q (bf16 Q) never reads the Q scales.
TEST_F(ModelRunnerTest, EvalStaticQColumnFollowsTheChosenSchemes) {
  const int V = tiny_->config().vocab_size;
  const TokenData data = {tokens(9, 3, V), tokens(6, 4, V)};
  const RankScales ph = slice_for_rank(calibrated(QuantType::kPerHead, true), 1, 0);
  ASSERT_TRUE(ph.q.has_value());
  RankScales ph_dynamic = ph;
  ph_dynamic.q.reset();
  EvalOptions eo;
  eo.batch_size = 2;
  eo.schemes = {KvScheme::kFp8PerHeadBf16Q, KvScheme::kFp8PerHead, KvScheme::kFp8E5m2};
  const EvalResult r = evaluate(*tiny_, *backend_, *ops_, data, RankScales{}, ph, eo);
  std::vector<std::string> labels;
  for (const SchemeEval& e : r.schemes) labels.push_back(e.label);
  EXPECT_EQ(labels, (std::vector<std::string>{"bf16", "fp8-per-head-bf16q", "fp8-per-head",
                                              "per-head static-Q", "fp8-e5m2"}));
  ASSERT_EQ(r.schemes.size(), 5u);
  EXPECT_EQ(r.schemes[3].scheme, KvScheme::kFp8PerHead);
  for (size_t i : {1u, 2u, 4u}) EXPECT_TRUE(r.schemes[i].q_range_use.empty()) << labels[i];
  EXPECT_FALSE(r.schemes[3].q_range_use.empty());
  const std::string table = format_eval_table(r);
  EXPECT_NE(table.find("fp8-per-head-bf16q"), std::string::npos) << table;
  EXPECT_NE(table.find("per-head static-Q:"), std::string::npos) << table;

  // Without fp8-per-head there is no static-Q column, and fp8-per-head-bf16q gives the same
  // numbers whether the file has Q scales or not.
  eo.schemes = {KvScheme::kFp8PerHeadBf16Q};
  const EvalResult b = evaluate(*tiny_, *backend_, *ops_, data, RankScales{}, ph, eo);
  const EvalResult bd = evaluate(*tiny_, *backend_, *ops_, data, RankScales{}, ph_dynamic, eo);
  ASSERT_EQ(b.schemes.size(), 2u);
  ASSERT_EQ(bd.schemes.size(), 2u);
  EXPECT_EQ(b.schemes[1].label, "fp8-per-head-bf16q");
  EXPECT_EQ(b.schemes[1].kl_mean, bd.schemes[1].kl_mean);
  EXPECT_EQ(b.schemes[1].attn_rel_error, bd.schemes[1].attn_rel_error);
  EXPECT_EQ(b.schemes[1].kl_mean, r.schemes[1].kl_mean);
  EXPECT_EQ(format_eval_table(b).find("static"), std::string::npos);
}

TEST_F(ModelRunnerTest, MakeModelIsDeterministicAndShardsLoadTheSame) {
  TempDir dir;
  ModelConfig c = model_preset("qwen2-tiny");
  make_model(dir.path() + "/a", c, 7);
  make_model(dir.path() + "/b", c, 7, 1 << 20);  // 1 MiB shards
  EXPECT_TRUE(std::filesystem::exists(dir.path() + "/b/model.safetensors.index.json"));
  WeightStore a(dir.path() + "/a"), b(dir.path() + "/b");
  EXPECT_EQ(a.files().size(), 1u);
  EXPECT_GT(b.files().size(), 2u);
  for (const char* name : {"model.embed_tokens.weight", "model.layers.1.self_attn.k_proj.weight",
                           "model.layers.0.self_attn.k_proj.bias", "model.norm.weight"}) {
    const auto shape = a.info(name).shape;
    EXPECT_EQ(a.read_f32(name, shape), b.read_f32(name, shape)) << name;
  }
  EXPECT_FALSE(a.has("lm_head.weight"));  // tied
  EXPECT_THROW(model_preset("huge"), Error);
}

TEST_F(ModelRunnerTest, MissingWeightNamesTensor) {
  TempDir dir;
  ModelConfig c = model_preset("tiny");
  c.num_layers = 1;
  make_model(dir.path(), c);
  // Claim two layers: layer 1's weights are missing.
  c.num_layers = 2;
  {
    std::ofstream out(dir.path() + "/config.json");
    out << model_config_to_json(c);
  }
  const std::string e = error_of([&] { Model::load(dir.path(), *backend_); });
  EXPECT_NE(e.find("model.layers.1.input_layernorm.weight"), std::string::npos) << e;
}

}  // namespace
}  // namespace fp8kv
