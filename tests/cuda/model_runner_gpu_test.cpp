// The model runner on the CUDA backend (cuBLAS bf16 weights, CUDA model ops) against the CPU
// runner on the tiny random-weight model, for the three KV caches: prefill logits, then 20
// teacher-forced decode steps (both runners get the same tokens, so their inputs never diverge)
// and greedy generation.
//
// Two CPU references (STYLE.md: compare with a reference in the same precision):
//   - "emulated": the CPU ops with x rounded to bf16 before every GEMM, as the GPU does. The
//     GPU differs from it by fp32 summation order (cuBLAS vs BLAS) and by the attention kernels
//     (for fp8-per-head the CPU twin rounds P to e4m3, the GPU decode keeps P in fp32), plus the
//     bf16 roundings of Q/K/V/O that such differences flip. The CPU runner's own prefill vs
//     decode differ by up to 2e-3 for the same reasons (tests/runtime/model_runner_test.cpp).
//     Bound: normalized logit error 1e-2 (bf16 cache), 3e-2 (FP8 caches).
//   - "fp32": the plain CPU runner (fp32 activations into the GEMMs; the weights are the same
//     values, the checkpoint being bf16). Bound: 3e-2 (bf16 cache), 5e-2 (FP8 caches).
// Greedy tokens: the GPU's argmax must equal the emulated CPU's at every step unless the two
// tokens' CPU logits are within twice the largest logit difference of that row (a near tie);
// generate() (argmax on the device) must then reproduce the CPU's tokens exactly when no near
// tie occurred. The FP8 scales come from a CPU calibration.
//
// The tests without "Gpu" in their name run on the CPU backend: forward_greedy and
// append_random_context, the pieces the benchmark uses.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "fp8kv/backend.h"
#include "fp8kv/calib.h"
#include "fp8kv/error.h"
#include "fp8kv/fp8.h"
#include "fp8kv/make_model.h"
#include "fp8kv/model.h"
#include "fp8kv/workflows.h"
#include "gpu_skip.h"
#include "runtime/bf16_activation_ops.h"
#include "runtime/test_util.h"

namespace fp8kv {
namespace {

std::vector<int32_t> tokens(int n, int seed, int vocab) {
  std::vector<int32_t> t;
  for (int i = 0; i < n; ++i) t.push_back(static_cast<int32_t>((seed * 7919 + i * 104729) % vocab));
  return t;
}

// ||a - ref|| / ||ref||; any non-finite value fails.
double norm_err(const std::vector<float>& a, const std::vector<float>& ref) {
  EXPECT_EQ(a.size(), ref.size());
  double d = 0, r = 0;
  for (size_t i = 0; i < a.size() && i < ref.size(); ++i) {
    if (!std::isfinite(a[i]) || !std::isfinite(ref[i])) {
      ADD_FAILURE() << "non-finite logit at " << i << ": " << a[i] << " vs " << ref[i];
      return INFINITY;
    }
    d += (static_cast<double>(a[i]) - ref[i]) * (static_cast<double>(a[i]) - ref[i]);
    r += static_cast<double>(ref[i]) * ref[i];
  }
  return std::sqrt(d / r);
}

int32_t argmax(const float* row, int vocab) {
  return static_cast<int32_t>(std::max_element(row, row + vocab) - row);
}

class ModelRunnerGpu : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    make_model(dir_->path() + "/tiny", model_preset("tiny"));
    make_model(dir_->path() + "/qwen2", model_preset("qwen2-tiny"));
    cpu_ = make_cpu_backend().release();
    cpu_ops_ = make_cpu_model_ops().release();
    emu_ops_ = new Bf16ActivationCpuOps();
    tiny_cpu_ = Model::load(dir_->path() + "/tiny", *cpu_).release();
  }
  static void TearDownTestSuite() {
    delete tiny_cpu_;
    delete emu_ops_;
    delete cpu_ops_;
    delete cpu_;
    delete dir_;
  }

  static TokenData calib_data() {
    const int V = tiny_cpu_->config().vocab_size;
    return {tokens(24, 1, V), tokens(17, 2, V), tokens(30, 3, V), tokens(9, 4, V)};
  }
  static CalibData calibrated(QuantType qt, bool q_scales = false) {
    CalibrateOptions co;
    co.quant_type = qt;
    co.batch_size = 2;
    co.q_scales = q_scales;
    return calibrate(*tiny_cpu_, *cpu_, *cpu_ops_, calib_data(), co).data;
  }

  static TempDir* dir_;
  static Backend* cpu_;
  static ModelOps* cpu_ops_;
  static ModelOps* emu_ops_;
  static Model* tiny_cpu_;
};

TempDir* ModelRunnerGpu::dir_ = nullptr;
Backend* ModelRunnerGpu::cpu_ = nullptr;
ModelOps* ModelRunnerGpu::cpu_ops_ = nullptr;
ModelOps* ModelRunnerGpu::emu_ops_ = nullptr;
Model* ModelRunnerGpu::tiny_cpu_ = nullptr;

struct Bounds {
  double vs_emulated;
  double vs_fp32;
};

// Prefill of three prompts of different lengths, then 20 teacher-forced decode steps, on the
// GPU, the emulated CPU and the fp32 CPU; then greedy generate() on the GPU and emulated CPU.
void compare_gpu_with_cpu(const std::string& model_dir, Backend& cpu, ModelOps& emu_ops,
                          ModelOps& cpu_ops, KvScheme scheme, const CalibData* calib,
                          Bounds bounds) {
  auto gpu = make_cuda_backend(0, nullptr);
  auto gpu_ops = make_cuda_model_ops(*gpu, nullptr);
  auto m_gpu = Model::load(model_dir, *gpu, false, WeightDtype::kBf16);
  auto m_cpu = Model::load(model_dir, cpu, false, WeightDtype::kF32);
  const int V = m_cpu->config().vocab_size;
  auto opts = [&] {
    RunnerOptions o;
    o.scheme = scheme;
    o.num_slots = 1024;
    o.max_requests = 4;
    o.max_len = 128;
    if (calib) o.scales = slice_for_rank(*calib, 1, 0);
    return o;
  };
  ModelRunner g(*m_gpu, *gpu, *gpu_ops, opts());
  ModelRunner e(*m_cpu, cpu, emu_ops, opts());
  ModelRunner f(*m_cpu, cpu, cpu_ops, opts());
  // FP8 caches: K/V codes flip wherever the GPU's bf16-rounded GEMM inputs move a value across
  // an e4m3 rounding boundary (a step of up to 2^-3 relative), and those flips pass through
  // sharp attention, so a GPU FP8 run and a CPU FP8 run do not agree to bf16 precision (seen on
  // the H100: 3-6% normalized logit difference). What must hold instead, as in FA3's tests, is
  // that the GPU's FP8 run is as close to the exact run (bf16 cache, fp32 CPU: runner t) as the
  // CPU's own FP8 run is: err_gpu <= kFp8Factor * err_cpu + vs_emulated, vs_emulated being the
  // bf16-level difference of the GPU model path.
  constexpr double kFp8Factor = 1.25;
  const bool fp8 = is_fp8(scheme);
  RunnerOptions exact_opts = opts();
  exact_opts.scheme = KvScheme::kBf16;
  exact_opts.scales.reset();
  ModelRunner t(*m_cpu, cpu, cpu_ops, exact_opts);
  std::vector<int> rt;
  const std::vector<std::vector<int32_t>> prompts = {tokens(5, 11, V), tokens(17, 12, V),
                                                     tokens(33, 13, V)};
  std::vector<int> rg, re, rf;
  for (size_t b = 0; b < prompts.size(); ++b) {
    rg.push_back(g.add_request());
    re.push_back(e.add_request());
    rf.push_back(f.add_request());
    rt.push_back(t.add_request());
  }
  const std::string name = std::string(scheme_name(scheme)) + " cache, " + model_dir;
  double worst_e = 0, worst_f = 0, worst_gpu_exact = 0, worst_cpu_exact = 0;
  int near_ties = 0;
  auto compare = [&](const std::vector<float>& lg, const std::vector<float>& le,
                     const std::vector<float>& lf, const std::vector<float>& lt,
                     const std::string& where) {
    const double ee = norm_err(lg, le), ef = norm_err(lg, lf);
    worst_e = std::max(worst_e, ee);
    worst_f = std::max(worst_f, ef);
    if (!fp8) {
      EXPECT_LE(ee, bounds.vs_emulated) << name << ", " << where << ": GPU vs emulated CPU";
      EXPECT_LE(ef, bounds.vs_fp32) << name << ", " << where << ": GPU vs fp32 CPU";
      return;
    }
    const double eg = norm_err(lg, lt), ec = norm_err(le, lt);
    worst_gpu_exact = std::max(worst_gpu_exact, eg);
    worst_cpu_exact = std::max(worst_cpu_exact, ec);
    EXPECT_LE(eg, kFp8Factor * ec + bounds.vs_emulated)
        << name << ", " << where << ": GPU FP8 error vs the exact run " << eg
        << " against the CPU FP8 run's " << ec;
  };
  const std::vector<float> prefill_e = e.forward(re, prompts, LogitRows::kAll);
  compare(g.forward(rg, prompts, LogitRows::kAll), prefill_e,
          f.forward(rf, prompts, LogitRows::kAll), t.forward(rt, prompts, LogitRows::kAll),
          "prefill (every prompt position)");

  // Teacher forcing with the emulated CPU's greedy tokens.
  std::vector<std::vector<int32_t>> step(prompts.size());
  size_t row = 0;
  for (size_t b = 0; b < prompts.size(); ++b) {
    row += prompts[b].size();
    step[b] = {argmax(prefill_e.data() + (row - 1) * V, V)};
  }
  for (int s = 0; s < 20; ++s) {
    const std::vector<float> lg = g.forward(rg, step, LogitRows::kLast);
    const std::vector<float> le = e.forward(re, step, LogitRows::kLast);
    const std::vector<float> lf = f.forward(rf, step, LogitRows::kLast);
    const std::vector<float> lt = t.forward(rt, step, LogitRows::kLast);
    compare(lg, le, lf, lt, "decode step " + std::to_string(s));
    for (size_t b = 0; b < prompts.size(); ++b) {
      const float* rowg = lg.data() + b * V;
      const float* rowe = le.data() + b * V;
      const int32_t tg = argmax(rowg, V), te = argmax(rowe, V);
      if (tg != te && !fp8) {
        float max_diff = 0;
        for (int i = 0; i < V; ++i) max_diff = std::max(max_diff, std::fabs(rowg[i] - rowe[i]));
        const float gap = rowe[te] - rowe[tg];
        EXPECT_LE(gap, 2 * max_diff)
            << name << ", decode step " << s << ", request " << b << ": GPU picks " << tg
            << ", CPU " << te << " and the CPU gap " << gap << " is no near tie";
        ++near_ties;
      }
      step[b] = {te};
    }
  }
  std::printf(
      "[ info ] %s: worst normalized logit error vs emulated CPU %.2e (bound %.0e), vs "
      "fp32 CPU %.2e (bound %.0e), %d near-tie argmax flips\n",
      name.c_str(), worst_e, bounds.vs_emulated, worst_f, bounds.vs_fp32, near_ties);
  if (fp8) {
    std::printf("[ info ] %s: worst error vs the exact run: GPU %.2e, CPU %.2e\n", name.c_str(),
                worst_gpu_exact, worst_cpu_exact);
  }

  for (size_t b = 0; b < prompts.size(); ++b) {
    g.release(rg[b]);
    e.release(re[b]);
  }
  const auto gen_g = g.generate(prompts, 16);
  const auto gen_e = e.generate(prompts, 16);
  if (fp8) {
    // FP8 code flips (above) may move greedy tokens; the logit criterion above is the check.
  } else if (near_ties == 0) {
    EXPECT_EQ(gen_g, gen_e) << name << ": greedy generate() differs from the emulated CPU";
  } else {
    std::printf("[ info ] %s: near ties seen; generate() token equality not required\n",
                name.c_str());
  }
}

TEST_F(ModelRunnerGpu, GpuBf16CacheMatchesCpu) {
  SKIP_WITHOUT_GPU();
  compare_gpu_with_cpu(dir_->path() + "/tiny", *cpu_, *emu_ops_, *cpu_ops_, KvScheme::kBf16,
                       nullptr, {1e-2, 3e-2});
}

TEST_F(ModelRunnerGpu, GpuFp8PerHeadCacheMatchesCpu) {
  SKIP_WITHOUT_GPU();
  const CalibData calib = calibrated(QuantType::kPerHead);
  compare_gpu_with_cpu(dir_->path() + "/tiny", *cpu_, *emu_ops_, *cpu_ops_, KvScheme::kFp8PerHead,
                       &calib, {1e-2, 3e-2});
}

// Static Q scales (q_calibration): quantize_q with the file's scale on the GPU, the same bound.
TEST_F(ModelRunnerGpu, GpuFp8PerHeadStaticQMatchesCpu) {
  SKIP_WITHOUT_GPU();
  const CalibData calib = calibrated(QuantType::kPerHead, /*q_scales=*/true);
  ASSERT_TRUE(calib.q_scales.has_value());
  compare_gpu_with_cpu(dir_->path() + "/tiny", *cpu_, *emu_ops_, *cpu_ops_, KvScheme::kFp8PerHead,
                       &calib, {1e-2, 3e-2});
}

// calibrate --q-scales on the GPU: Q's abs-max observed by the CUDA quantize_q in the bf16-cache
// pass. The GPU runs bf16 weights, the CPU fp32, so Q differs by about a bf16 rounding of the
// GEMM inputs (2^-8 relative) and its abs-max likewise; 2e-2 leaves room for a few such steps
// through the layers, and K/V get the same bound.
TEST_F(ModelRunnerGpu, GpuCalibrationQScalesMatchCpu) {
  SKIP_WITHOUT_GPU();
  const CalibData want = calibrated(QuantType::kPerHead, /*q_scales=*/true);
  auto gpu = make_cuda_backend(0, nullptr);
  auto gpu_ops = make_cuda_model_ops(*gpu, nullptr);
  auto m_gpu = Model::load(dir_->path() + "/tiny", *gpu, false, WeightDtype::kBf16);
  CalibrateOptions co;
  co.quant_type = QuantType::kPerHead;
  co.batch_size = 2;
  co.q_scales = true;
  const CalibData got = calibrate(*m_gpu, *gpu, *gpu_ops, calib_data(), co).data;
  ASSERT_TRUE(got.q_scales.has_value());
  ASSERT_EQ(got.q_scales->scales.size(), want.q_scales->scales.size());
  for (size_t i = 0; i < want.q_scales->scales.size(); ++i) {
    const double a = got.q_scales->scales[i], b = want.q_scales->scales[i];
    EXPECT_LE(std::fabs(a - b), 2e-2 * b) << "Q scale " << i << ": GPU " << a << ", CPU " << b;
  }
  ASSERT_EQ(got.scales.size(), want.scales.size());
  for (size_t i = 0; i < want.scales.size(); ++i) {
    EXPECT_LE(std::fabs(got.scales[i] - want.scales[i]), 2e-2 * want.scales[i])
        << "K/V scale " << i;
  }
}

TEST_F(ModelRunnerGpu, GpuFp8PerTensorCacheMatchesCpu) {
  SKIP_WITHOUT_GPU();
  const CalibData calib = calibrated(QuantType::kPerTensor);
  compare_gpu_with_cpu(dir_->path() + "/tiny", *cpu_, *emu_ops_, *cpu_ops_, KvScheme::kFp8PerTensor,
                       &calib, {1e-2, 3e-2});
}

TEST_F(ModelRunnerGpu, GpuFp8E5m2CacheMatchesCpu) {
  SKIP_WITHOUT_GPU();
  compare_gpu_with_cpu(dir_->path() + "/tiny", *cpu_, *emu_ops_, *cpu_ops_, KvScheme::kFp8E5m2,
                       nullptr, {1e-2, 3e-2});
}

TEST_F(ModelRunnerGpu, GpuFp8PerHeadBf16QCacheMatchesCpu) {
  SKIP_WITHOUT_GPU();
  const CalibData calib = calibrated(QuantType::kPerHead);
  compare_gpu_with_cpu(dir_->path() + "/tiny", *cpu_, *emu_ops_, *cpu_ops_,
                       KvScheme::kFp8PerHeadBf16Q, &calib, {1e-2, 3e-2});
}

// Qwen2: attention biases (the bias kernel) and tied embeddings (the bf16 LM head is the
// embedding table).
TEST_F(ModelRunnerGpu, GpuQwen2BiasAndTiedEmbeddingsMatchCpu) {
  SKIP_WITHOUT_GPU();
  compare_gpu_with_cpu(dir_->path() + "/qwen2", *cpu_, *emu_ops_, *cpu_ops_, KvScheme::kBf16,
                       nullptr, {1e-2, 3e-2});
}

// forward_greedy is forward(kLast) + the host argmax, on any backend.
void expect_greedy_matches_logits(const Model& model, Backend& backend, ModelOps& ops) {
  const int V = model.config().vocab_size;
  RunnerOptions o;
  o.num_slots = 256;
  o.max_requests = 2;
  o.max_len = 64;
  ModelRunner a(model, backend, ops, o);
  ModelRunner b(model, backend, ops, o);
  const std::vector<std::vector<int32_t>> prompts = {tokens(7, 21, V), tokens(3, 22, V)};
  const std::vector<int> ra = {a.add_request(), a.add_request()};
  const std::vector<int> rb = {b.add_request(), b.add_request()};
  std::vector<std::vector<int32_t>> in = prompts;
  for (int s = 0; s < 4; ++s) {
    const std::vector<float> logits = a.forward(ra, in, LogitRows::kLast);
    const std::vector<int32_t> greedy = b.forward_greedy(rb, in);
    ASSERT_EQ(greedy.size(), in.size());
    for (size_t r = 0; r < in.size(); ++r) {
      EXPECT_EQ(greedy[r], argmax(logits.data() + r * V, V)) << "step " << s << " request " << r;
      in[r] = {greedy[r]};
    }
  }
}

TEST_F(ModelRunnerGpu, ForwardGreedyMatchesHostArgmax) {
  expect_greedy_matches_logits(*tiny_cpu_, *cpu_, *cpu_ops_);
}

TEST_F(ModelRunnerGpu, GpuForwardGreedyMatchesHostArgmax) {
  SKIP_WITHOUT_GPU();
  auto gpu = make_cuda_backend(0, nullptr);
  auto gpu_ops = make_cuda_model_ops(*gpu, nullptr);
  auto m = Model::load(dir_->path() + "/tiny", *gpu, false, WeightDtype::kBf16);
  expect_greedy_matches_logits(*m, *gpu, *gpu_ops);
}

// append_random_context grows each request by `count` tokens (its slots taken from the pool)
// and a decode step after it runs over the full length, for every scheme.
void expect_random_context_works(const Model& model, Backend& backend, ModelOps& ops,
                                 KvScheme scheme, const CalibData* calib) {
  const int V = model.config().vocab_size;
  RunnerOptions o;
  o.scheme = scheme;
  o.num_slots = 3 * 300;
  o.max_requests = 3;
  o.max_len = 300;
  if (calib) o.scales = slice_for_rank(*calib, 1, 0);
  ModelRunner r(model, backend, ops, o);
  const std::vector<int> reqs = {r.add_request(), r.add_request(), r.add_request()};
  r.forward_greedy(reqs, {tokens(4, 1, V), tokens(9, 2, V), tokens(1, 3, V)});
  r.append_random_context(reqs, 250, 7);
  EXPECT_EQ(r.seq_len(reqs[0]), 254);
  EXPECT_EQ(r.seq_len(reqs[1]), 259);
  EXPECT_EQ(r.seq_len(reqs[2]), 251);
  EXPECT_EQ(r.free_slots(), 900 - 254 - 259 - 251);
  const std::vector<float> logits = r.forward(reqs, {{1}, {2}, {3}}, LogitRows::kLast);
  ASSERT_EQ(logits.size(), 3u * V);
  for (float x : logits) ASSERT_TRUE(std::isfinite(x)) << scheme_name(scheme);
  // More than max_len is refused.
  EXPECT_THROW(r.append_random_context(reqs, 100, 7), Error);
}

TEST_F(ModelRunnerGpu, AppendRandomContextExtendsEveryRequest) {
  expect_random_context_works(*tiny_cpu_, *cpu_, *cpu_ops_, KvScheme::kBf16, nullptr);
  const CalibData ph = calibrated(QuantType::kPerHead);
  expect_random_context_works(*tiny_cpu_, *cpu_, *cpu_ops_, KvScheme::kFp8PerHead, &ph);
}

TEST_F(ModelRunnerGpu, GpuAppendRandomContextExtendsEveryRequest) {
  SKIP_WITHOUT_GPU();
  auto gpu = make_cuda_backend(0, nullptr);
  auto gpu_ops = make_cuda_model_ops(*gpu, nullptr);
  auto m = Model::load(dir_->path() + "/tiny", *gpu, false, WeightDtype::kBf16);
  expect_random_context_works(*m, *gpu, *gpu_ops, KvScheme::kBf16, nullptr);
  const CalibData pt = calibrated(QuantType::kPerTensor);
  expect_random_context_works(*m, *gpu, *gpu_ops, KvScheme::kFp8PerTensor, &pt);
}

// RunnerOptions::cuda_graph must not change a bit. The same passes run on the default
// configuration (legacy default stream, eager) and with graphs (the backend on its own stream,
// decode steps recorded and replayed): a prefill of three prompts (490, 200 and 7 tokens),
// 30 teacher-forced decode steps with LogitRows::kLast, then greedy generate() (the device
// argmax inside the graph). The longest request goes from 490 to 520 tokens, across 512 where
// the decode split of the KV length changes (2 splits of 256 tokens, then of 320, whatever
// the GPU's SM count: the batch is far too small to fill it), so the graph run must record
// again; logits and tokens must be identical (memcmp, not a tolerance).
struct GraphRun {
  std::vector<float> logits;                 // prefill rows, then every decode step's
  std::vector<std::vector<int32_t>> tokens;  // generate()
  GraphStats forward_stats, stats;           // after the teacher-forced steps, at the end
};

// prompt_lens: the three prompts; then_generate: also the greedy generate() afterwards.
GraphRun run_for_graph_test(const std::string& model_dir, KvScheme scheme, const CalibData* calib,
                            bool graph, bool own_stream,
                            const std::vector<int>& prompt_lens = {490, 200, 7},
                            bool then_generate = true) {
  auto backend = own_stream ? make_cuda_backend_own_stream(0) : make_cuda_backend(0, nullptr);
  auto ops = make_cuda_model_ops(*backend, backend->cuda_stream());
  auto model = Model::load(model_dir, *backend, false, WeightDtype::kBf16);
  const int V = model->config().vocab_size;
  RunnerOptions o;
  o.scheme = scheme;
  o.num_slots = 4096;
  o.max_requests = 4;
  o.max_len = 1024;
  o.cuda_graph = graph;
  if (calib) o.scales = slice_for_rank(*calib, 1, 0);
  ModelRunner r(*model, *backend, *ops, o);
  std::vector<std::vector<int32_t>> prompts;
  for (size_t b = 0; b < prompt_lens.size(); ++b) {
    prompts.push_back(tokens(prompt_lens[b], 21 + static_cast<int>(b), V));
  }
  std::vector<int> reqs;
  for (size_t b = 0; b < prompts.size(); ++b) reqs.push_back(r.add_request());
  GraphRun out;
  out.logits = r.forward(reqs, prompts, LogitRows::kLast);
  for (int s = 0; s < 30; ++s) {
    std::vector<std::vector<int32_t>> step;
    for (size_t b = 0; b < prompts.size(); ++b) {
      step.push_back({static_cast<int32_t>((s * 131 + static_cast<int>(b) * 17) % V)});
    }
    const std::vector<float> l = r.forward(reqs, step, LogitRows::kLast);
    out.logits.insert(out.logits.end(), l.begin(), l.end());
  }
  EXPECT_EQ(r.seq_len(reqs[0]), prompt_lens[0] + 30);
  out.forward_stats = r.graph_stats();
  out.stats = out.forward_stats;
  if (!then_generate) return out;
  for (int q : reqs) r.release(q);
  out.tokens = r.generate(prompts, 30);
  out.stats = r.graph_stats();
  return out;
}

void expect_graph_matches_eager(const std::string& model_dir, KvScheme scheme,
                                const CalibData* calib) {
  const std::string name = std::string(scheme_name(scheme)) + " cache";
  const GraphRun eager = run_for_graph_test(model_dir, scheme, calib, false, false);
  const GraphRun graph = run_for_graph_test(model_dir, scheme, calib, true, true);
  ASSERT_EQ(eager.logits.size(), graph.logits.size()) << name;
  size_t differ = 0, first = eager.logits.size();
  for (size_t i = 0; i < eager.logits.size(); ++i) {
    if (std::memcmp(&eager.logits[i], &graph.logits[i], sizeof(float)) != 0) {
      if (differ++ == 0) first = i;
    }
  }
  EXPECT_EQ(differ, 0u) << name << ": " << differ << " logits differ, the first at " << first;
  EXPECT_EQ(eager.tokens, graph.tokens) << name << ": generate() differs with graphs";
  EXPECT_EQ(eager.stats.replays, 0) << name;
  // Teacher forcing: the first decode step of each split warms up eagerly, the next records;
  // the split changes once on the way, so two recordings; every other step replays.
  EXPECT_EQ(graph.forward_stats.failed, 0) << name;
  EXPECT_GE(graph.forward_stats.captures, 2) << name << ": no re-recording at the split change";
  EXPECT_GE(graph.forward_stats.replays, 30 - 2 * graph.forward_stats.captures) << name;
  // generate(): the greedy steps are keys of their own, recorded as well.
  EXPECT_GT(graph.stats.captures, graph.forward_stats.captures) << name;
  EXPECT_GT(graph.stats.replays, graph.forward_stats.replays) << name;
  std::printf("[ info ] %s: graphs: %lld recorded, %lld replayed, %lld eager decode steps\n",
              name.c_str(), static_cast<long long>(graph.stats.captures),
              static_cast<long long>(graph.stats.replays),
              static_cast<long long>(graph.stats.eager_decode));
}

TEST_F(ModelRunnerGpu, GpuCudaGraphDecodeMatchesEagerBitForBit) {
  SKIP_WITHOUT_GPU();
  expect_graph_matches_eager(dir_->path() + "/tiny", KvScheme::kBf16, nullptr);
  const CalibData ph = calibrated(QuantType::kPerHead);
  expect_graph_matches_eager(dir_->path() + "/tiny", KvScheme::kFp8PerHead, &ph);
  const CalibData pt = calibrated(QuantType::kPerTensor);
  expect_graph_matches_eager(dir_->path() + "/tiny", KvScheme::kFp8PerTensor, &pt);
}

// A CUDA backend on the legacy default stream cannot be recorded: with cuda_graph the runner
// runs every decode step eagerly (saying why once on stderr) and gives the eager results.
TEST_F(ModelRunnerGpu, GpuCudaGraphOnTheDefaultStreamRunsEagerly) {
  SKIP_WITHOUT_GPU();
  auto backend = make_cuda_backend(0, nullptr);
  EXPECT_NE(backend->capture_unsupported().find("legacy default stream"), std::string::npos)
      << backend->capture_unsupported();
  EXPECT_TRUE(make_cuda_backend_own_stream(0)->capture_unsupported().empty());
  const GraphRun eager =
      run_for_graph_test(dir_->path() + "/tiny", KvScheme::kBf16, nullptr, false, false);
  const GraphRun fallback =
      run_for_graph_test(dir_->path() + "/tiny", KvScheme::kBf16, nullptr, true, false);
  EXPECT_EQ(fallback.stats.captures, 0);
  EXPECT_EQ(fallback.stats.replays, 0);
  EXPECT_EQ(eager.tokens, fallback.tokens);
  ASSERT_EQ(eager.logits.size(), fallback.logits.size());
  EXPECT_EQ(
      std::memcmp(eager.logits.data(), fallback.logits.data(), eager.logits.size() * sizeof(float)),
      0);
}

// A step whose decode does not split the KV length (every request shorter than a split's
// minimum) must keep its launch key while the context grows: one recording, then every step
// replays it (before, the unsplit launch carried max_seq_len as its split length, so each step
// was a new key and nothing was ever replayed: bench model's bf16 cache ran all eager).
TEST_F(ModelRunnerGpu, GpuCudaGraphUnsplitStepsReplayOneRecording) {
  SKIP_WITHOUT_GPU();
  // The longest request: 101 .. 130 keys, below a split's 256.
  const std::vector<int> lens = {100, 40, 7};
  const std::string tiny = dir_->path() + "/tiny";
  const GraphRun eager =
      run_for_graph_test(tiny, KvScheme::kBf16, nullptr, false, true, lens, false);
  const GraphRun graph =
      run_for_graph_test(tiny, KvScheme::kBf16, nullptr, true, true, lens, false);
  ASSERT_EQ(eager.logits.size(), graph.logits.size());
  EXPECT_EQ(
      std::memcmp(eager.logits.data(), graph.logits.data(), eager.logits.size() * sizeof(float)),
      0);
  const GraphStats& g = graph.forward_stats;
  EXPECT_EQ(g.captures, 1);  // one key for all 30 steps
  EXPECT_EQ(g.eager_decode + g.replays, 30);
  EXPECT_GE(g.replays, 28);  // all but the warm-up (and a re-warm-up if a buffer grew)
}

}  // namespace
}  // namespace fp8kv
