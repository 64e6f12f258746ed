// Tensor parallelism of the model runner on the CPU: tp ranks as threads of this process
// (ThreadedGroup), each with its own backend and its shard of the tiny model (8 Q heads,
// 2 KV heads), against the tp = 1 run. tp = 2 splits the KV heads; tp = 4 replicates them
// (4 ranks over 2 KV heads, each head on 2 ranks).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "fp8kv/backend.h"
#include "fp8kv/calib.h"
#include "fp8kv/threaded_communicator.h"
#include "fp8kv/error.h"
#include "fp8kv/make_model.h"
#include "fp8kv/model.h"
#include "fp8kv/workflows.h"
#include "runtime/test_util.h"

namespace fp8kv {
namespace {

std::vector<int32_t> tokens(int n, int seed, int vocab) {
  std::vector<int32_t> t;
  for (int i = 0; i < n; ++i) t.push_back(static_cast<int32_t>((seed * 7919 + i * 104729) % vocab));
  return t;
}

RunnerOptions small(KvScheme scheme = KvScheme::kBf16) {
  RunnerOptions o;
  o.scheme = scheme;
  o.num_slots = 256;
  o.max_requests = 4;
  o.max_len = 64;
  return o;
}

class TensorParallelTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    model_dir_ = new std::string(dir_->path() + "/tiny");
    make_model(*model_dir_, model_preset("tiny"));
    backend_ = make_cpu_backend().release();
    ops_ = make_cpu_model_ops().release();
    tiny_ = Model::load(*model_dir_, *backend_).release();
  }
  static void TearDownTestSuite() {
    delete tiny_;
    delete ops_;
    delete backend_;
    delete model_dir_;
    delete dir_;
  }

  // Runs body(rank's model, backend, ops, comm) on tp thread ranks, each with its own CPU
  // backend and its shard of the tiny model.
  static void on_ranks(
      int tp, const std::function<void(const Model&, Backend&, ModelOps&, Communicator&)>& body) {
    run_ranks(tp, [&](Communicator& comm) {
      auto backend = make_cpu_backend();
      auto ops = make_cpu_model_ops();
      auto model = Model::load(*model_dir_, *backend, false, WeightDtype::kF32, tp, comm.rank());
      body(*model, *backend, *ops, comm);
    });
  }

  static TokenData calib_data() {
    const int V = tiny_->config().vocab_size;
    return {tokens(24, 1, V), tokens(17, 2, V), tokens(30, 3, V)};
  }
  static CalibrateOptions calib_options(QuantType qt, Communicator* comm) {
    CalibrateOptions co;
    co.quant_type = qt;
    co.batch_size = 2;
    co.comm = comm;
    co.exact_tp = true;  // the tests below compare tp N with tp 1 value for value
    return co;
  }

  static TempDir* dir_;
  static std::string* model_dir_;
  static Backend* backend_;
  static ModelOps* ops_;
  static Model* tiny_;
};

TempDir* TensorParallelTest::dir_ = nullptr;
std::string* TensorParallelTest::model_dir_ = nullptr;
Backend* TensorParallelTest::backend_ = nullptr;
ModelOps* TensorParallelTest::ops_ = nullptr;
Model* TensorParallelTest::tiny_ = nullptr;

TEST(ThreadedCommunicator, AllReduceSumIsTheSameOnEveryRank) {
  constexpr int kWorld = 3;
  std::vector<std::vector<float>> got(kWorld);
  run_ranks(kWorld, [&](Communicator& comm) {
    std::vector<float> buf = {1.0f * comm.rank(), 0.1f, 1e8f * (comm.rank() == 1 ? 1 : -1)};
    comm.all_reduce_sum(buf.data(), buf.size());
    got[comm.rank()] = buf;
  });
  // Rank order 0 + 1 + 2 on every rank.
  const std::vector<float> want = {3.0f, (0.1f + 0.1f) + 0.1f, (-1e8f + 1e8f) + -1e8f};
  for (int r = 0; r < kWorld; ++r) EXPECT_EQ(got[r], want) << "rank " << r;
}

TEST(ThreadedCommunicator, AFailingRankFailsTheGroupInsteadOfHanging) {
  const std::string e = error_of([] {
    run_ranks(4, [](Communicator& comm) {
      if (comm.rank() == 2) throw Error("rank 2 broke");
      float x = 1.0f;
      comm.all_reduce_sum(&x, 1);  // the others wait here for rank 2
    });
  });
  EXPECT_EQ(e, "rank 2 broke");
}

TEST_F(TensorParallelTest, ShardsFollowTheHeadLayout) {
  const ModelConfig& c = tiny_->config();
  const TpShard s2 = make_tp_shard(c, 2, 1);
  EXPECT_EQ(s2.q_heads, 4);
  EXPECT_EQ(s2.q_head_begin, 4);
  EXPECT_EQ(s2.kv_heads, 1);
  EXPECT_EQ(s2.kv_head_begin, 1);
  EXPECT_EQ(s2.inter, c.intermediate_size / 2);
  // tp = 4 over 2 KV heads: ranks 0, 1 share KV head 0, ranks 2, 3 KV head 1 (the KV head of
  // their Q heads 4..7 under GQA groups of 4).
  for (int r = 0; r < 4; ++r) {
    const TpShard s = make_tp_shard(c, 4, r);
    EXPECT_EQ(s.q_heads, 2);
    EXPECT_EQ(s.kv_heads, 1);
    EXPECT_EQ(s.kv_head_begin, r / 2) << r;
    EXPECT_EQ(s.q_head_begin / (c.num_q_heads / c.num_kv_heads), s.kv_head_begin) << r;
  }
}

TEST_F(TensorParallelTest, Refusals) {
  EXPECT_NE(error_of([] {
              Model::load(*model_dir_, *backend_, false, WeightDtype::kF32, 3, 0);
            }).find("tp must divide the 8 attention (Q) heads"),
            std::string::npos);
  ModelConfig c = tiny_->config();
  c.num_q_heads = 12;
  c.num_kv_heads = 4;  // tp 6: neither divides the other
  EXPECT_NE(error_of([&] { make_tp_shard(c, 6, 0); }).find("KV heads"), std::string::npos);
  EXPECT_NE(error_of([&] { make_tp_shard(tiny_->config(), 2, 2); }).find("rank 2"),
            std::string::npos);
  // A shard without its communicator.
  auto shard = Model::load(*model_dir_, *backend_, false, WeightDtype::kF32, 2, 0);
  EXPECT_NE(error_of([&] {
              ModelRunner(*shard, *backend_, *ops_, small());
            }).find("needs a communicator"),
            std::string::npos);
  // Scales sliced for another tp.
  const CalibData calib =
      calibrate(*tiny_, *backend_, *ops_, calib_data(), calib_options(QuantType::kPerHead, nullptr))
          .data;
  RunnerOptions o = small(KvScheme::kFp8PerHead);
  o.scales = slice_for_rank(calib, 1, 0);
  run_ranks(2, [&](Communicator& comm) {
    auto backend = make_cpu_backend();
    auto model = Model::load(*model_dir_, *backend, false, WeightDtype::kF32, 2, comm.rank());
    RunnerOptions ro = o;
    ro.comm = &comm;
    EXPECT_NE(error_of([&] { ModelRunner(*model, *backend, *ops_, ro); }).find("KV heads"),
              std::string::npos);
  });
}

// (a) Greedy tokens equal tp = 1's; logits agree to fp32 summation order (o_proj and down_proj
// are summed in tp partial sums, then across ranks) and are bitwise the same on every rank.
TEST_F(TensorParallelTest, GreedyGenerationAndLogitsMatchTp1) {
  const int V = tiny_->config().vocab_size;
  const std::vector<std::vector<int32_t>> prompts = {tokens(11, 4, V), tokens(5, 6, V)};
  const std::vector<int32_t> probe = tokens(13, 5, V);
  ModelRunner ref(*tiny_, *backend_, *ops_, small());
  const auto want_tokens = ref.generate(prompts, 10);
  const int req = ref.add_request();
  const std::vector<float> want_logits = ref.forward({req}, {probe}, LogitRows::kAll);

  for (int tp : {2, 4}) {
    std::vector<std::vector<std::vector<int32_t>>> got_tokens(tp);
    std::vector<std::vector<float>> got_logits(tp);
    on_ranks(tp, [&](const Model& m, Backend& b, ModelOps& ops, Communicator& comm) {
      RunnerOptions o = small();
      o.comm = &comm;
      ModelRunner runner(m, b, ops, o);
      got_tokens[comm.rank()] = runner.generate(prompts, 10);
      const int r = runner.add_request();
      got_logits[comm.rank()] = runner.forward({r}, {probe}, LogitRows::kAll);
    });
    double max_abs = 0, max_ref = 0;
    for (size_t i = 0; i < want_logits.size(); ++i) {
      ASSERT_TRUE(std::isfinite(got_logits[0][i]));
      max_abs =
          std::max(max_abs, std::fabs(static_cast<double>(got_logits[0][i]) - want_logits[i]));
      max_ref = std::max(max_ref, std::fabs(static_cast<double>(want_logits[i])));
    }
    std::printf("tp %d: max |logit - tp1 logit| = %.3e (max |logit| %.3e)\n", tp, max_abs, max_ref);
    // fp32 reassociation over 4 layers, each amplified by the bf16 rounding of Q/K/V that
    // follows it (one bf16 ulp = 2^-8 relative): bound at 1e-2 of the largest logit.
    EXPECT_LT(max_abs, 1e-2 * max_ref) << "tp " << tp;
    for (int r = 0; r < tp; ++r) {
      EXPECT_EQ(got_tokens[r], want_tokens) << "tp " << tp << " rank " << r;
      EXPECT_EQ(got_logits[r], got_logits[0]) << "tp " << tp << " rank " << r;
    }
  }
}

// The same on qwen2-tiny: q/k/v biases sliced with their rows, tied embeddings, 4 KV heads
// (tp 4: one KV head per rank, no replication).
TEST_F(TensorParallelTest, Qwen2BiasShardsMatchTp1) {
  const std::string dir = dir_->path() + "/qwen2";
  make_model(dir, model_preset("qwen2-tiny"));
  auto whole = Model::load(dir, *backend_);
  const int V = whole->config().vocab_size;
  const std::vector<std::vector<int32_t>> prompts = {tokens(11, 4, V), tokens(5, 6, V)};
  ModelRunner ref(*whole, *backend_, *ops_, small());
  const auto want = ref.generate(prompts, 8);
  for (int tp : {2, 4}) {
    std::vector<std::vector<std::vector<int32_t>>> got(tp);
    run_ranks(tp, [&](Communicator& comm) {
      auto backend = make_cpu_backend();
      auto ops = make_cpu_model_ops();
      auto model = Model::load(dir, *backend, false, WeightDtype::kF32, tp, comm.rank());
      RunnerOptions o = small();
      o.comm = &comm;
      ModelRunner runner(*model, *backend, *ops, o);
      got[comm.rank()] = runner.generate(prompts, 8);
    });
    for (int r = 0; r < tp; ++r) EXPECT_EQ(got[r], want) << "tp " << tp << " rank " << r;
  }
}

// (b) The acceptance criterion: calibration at tp = N writes the tp = 1 file, value for
// value in float32, every layer. Layer 0 sees the embedding (the same bits at any tp); later
// layers see hidden states that went through o_proj and down_proj, whose sums the ranks split.
// calibrate() runs with exact_tp (RunnerOptions): every linear in one fixed order, a rank's
// row-parallel runs a subtree of the tp = 1 tree and the all-reduce its top, so the hidden
// states -- and so the abs-max of every layer -- are the same bits at tp = 1, 2, 4 and 8
// (tp 8 here: one Q head per rank, each KV head replicated on 4 ranks).
TEST_F(TensorParallelTest, CalibrationMatchesTp1) {
  for (QuantType qt : {QuantType::kPerHead, QuantType::kPerTensor}) {
    const CalibData want =
        calibrate(*tiny_, *backend_, *ops_, calib_data(), calib_options(qt, nullptr)).data;
    for (int tp : {2, 4, 8}) {
      std::vector<CalibData> got(tp);
      on_ranks(tp, [&](const Model& m, Backend& b, ModelOps& ops, Communicator& comm) {
        got[comm.rank()] = calibrate(m, b, ops, calib_data(), calib_options(qt, &comm)).data;
      });
      for (int r = 0; r < tp; ++r) {
        // Every rank finalizes to the same table (rank 0 writes it).
        EXPECT_EQ(got[r].scales, got[0].scales) << "rank " << r;
      }
      const CalibData& g = got[0];
      ASSERT_EQ(g.num_head, want.num_head);
      ASSERT_EQ(g.scales.size(), want.scales.size());
      const int width = want.row_width();
      for (size_t i = 0; i < want.scales.size(); ++i) {
        EXPECT_EQ(g.scales[i], want.scales[i]) << quant_type_name(qt) << " tp " << tp << " layer "
                                               << i / width << " column " << i % width;
      }
    }
  }
}

// calibrate --q-scales over ranks: with tp > Hkv (tp 4 over 2 KV heads) each rank sees half of
// a KV head's query heads, and the head's Q scale is the max of the two halves: tp 1's value.
TEST_F(TensorParallelTest, QScalesMatchTp1) {
  CalibrateOptions co = calib_options(QuantType::kPerHead, nullptr);
  co.q_scales = true;
  const CalibData want = calibrate(*tiny_, *backend_, *ops_, calib_data(), co).data;
  ASSERT_TRUE(want.q_scales.has_value());
  ASSERT_EQ(want.q_scales->num_head, tiny_->config().num_kv_heads);
  // Observing Q changes nothing about K/V.
  const CalibData kv_only =
      calibrate(*tiny_, *backend_, *ops_, calib_data(), calib_options(QuantType::kPerHead, nullptr))
          .data;
  EXPECT_EQ(want.scales, kv_only.scales);
  for (int tp : {2, 4}) {
    std::vector<CalibData> got(tp);
    on_ranks(tp, [&](const Model& m, Backend& b, ModelOps& ops, Communicator& comm) {
      CalibrateOptions c = calib_options(QuantType::kPerHead, &comm);
      c.q_scales = true;
      got[comm.rank()] = calibrate(m, b, ops, calib_data(), c).data;
    });
    for (int r = 0; r < tp; ++r) {
      ASSERT_TRUE(got[r].q_scales.has_value()) << "tp " << tp << " rank " << r;
      EXPECT_EQ(got[r].q_scales->num_head, want.q_scales->num_head);
      EXPECT_EQ(got[r].q_scales->scales, want.q_scales->scales) << "tp " << tp << " rank " << r;
      EXPECT_EQ(got[r].scales, want.scales) << "tp " << tp << " rank " << r;
    }
  }
}

// Static Q scales are the same on every rank (sliced like K's), so fp8-per-head under exact_tp
// gives tp 1's logits bit for bit at tp 2 and at tp 4 (replicated KV heads), where dynamic Q
// scales cannot (Fp8GenerationMatchesTp1's comment).
TEST_F(TensorParallelTest, StaticQScalesGiveTp1BitsAtEveryTp) {
  CalibrateOptions co = calib_options(QuantType::kPerHead, nullptr);
  co.q_scales = true;
  const CalibData calib = calibrate(*tiny_, *backend_, *ops_, calib_data(), co).data;
  const int V = tiny_->config().vocab_size;
  const std::vector<int32_t> probe = tokens(13, 5, V);
  auto run = [&](const Model& m, Backend& b, ModelOps& ops, Communicator* comm, int tp, int rank) {
    RunnerOptions o = small(KvScheme::kFp8PerHead);
    o.scales = slice_for_rank(calib, tp, rank);
    EXPECT_TRUE(o.scales->q.has_value());
    o.comm = comm;
    o.exact_tp = true;
    ModelRunner runner(m, b, ops, o);
    const int r = runner.add_request();
    std::vector<float> logits = runner.forward({r}, {probe}, LogitRows::kAll);
    for (int step = 0; step < 2; ++step) {  // decode steps
      const std::vector<float> d =
          runner.forward({r}, {{static_cast<int32_t>(step * 31 + 7)}}, LogitRows::kLast);
      logits.insert(logits.end(), d.begin(), d.end());
    }
    return logits;
  };
  const std::vector<float> want = run(*tiny_, *backend_, *ops_, nullptr, 1, 0);
  for (int tp : {2, 4}) {
    std::vector<std::vector<float>> got(tp);
    on_ranks(tp, [&](const Model& m, Backend& b, ModelOps& ops, Communicator& comm) {
      got[comm.rank()] = run(m, b, ops, &comm, tp, comm.rank());
    });
    for (int r = 0; r < tp; ++r) {
      ASSERT_EQ(got[r].size(), want.size());
      size_t differ = 0;
      for (size_t i = 0; i < want.size(); ++i) differ += got[r][i] != want[i];
      EXPECT_EQ(differ, 0u) << "tp " << tp << " rank " << r << ": logits differing from tp 1";
    }
  }
}

// exact_tp itself: the logits of a prefill and of decode steps at tp 2 and 4 are tp 1's bits.
TEST_F(TensorParallelTest, ExactTpLogitsAreTp1Bits) {
  const int V = tiny_->config().vocab_size;
  const std::vector<int32_t> probe = tokens(13, 5, V);
  auto run = [&](const Model& m, Backend& b, ModelOps& ops, Communicator* comm) {
    RunnerOptions o = small();
    o.comm = comm;
    o.exact_tp = true;
    ModelRunner runner(m, b, ops, o);
    const int r = runner.add_request();
    std::vector<float> logits = runner.forward({r}, {probe}, LogitRows::kAll);
    for (int step = 0; step < 3; ++step) {  // decode steps
      const std::vector<float> d =
          runner.forward({r}, {{static_cast<int32_t>(step * 31 + 7)}}, LogitRows::kLast);
      logits.insert(logits.end(), d.begin(), d.end());
    }
    return logits;
  };
  const std::vector<float> want = run(*tiny_, *backend_, *ops_, nullptr);
  for (int tp : {2, 4}) {
    std::vector<std::vector<float>> got(tp);
    on_ranks(tp, [&](const Model& m, Backend& b, ModelOps& ops, Communicator& comm) {
      got[comm.rank()] = run(m, b, ops, &comm);
    });
    for (int r = 0; r < tp; ++r) {
      ASSERT_EQ(got[r].size(), want.size());
      size_t differ = 0;
      for (size_t i = 0; i < want.size(); ++i) differ += got[r][i] != want[i];
      EXPECT_EQ(differ, 0u) << "tp " << tp << " rank " << r << ": logits differing from tp 1";
    }
  }
}

// (c) FP8 caches at tp = 2: the rank's slice of the tp = 1 scales, the same greedy tokens.
// Not tp = 4 for fp8-per-head: with replicated KV heads each rank takes the dynamic Q scale over
// its 2 of the group's 4 Q heads (model_runner.cpp), a different quantization of Q by design.
// Caveat for every token comparison here: the random tiny model's logits are nearly flat
// (top-2 margins can be below 1e-3), so a one-ulp bf16 (or one-step e4m3) flip of a K/V value
// caused by fp32 reassociation may flip a token after a few steps; measured, with these
// prompts and lengths the tokens agree (fp8kv generate --tp 2 with other prompts and 16 new
// tokens was seen to diverge after 6 tokens for fp8-per-tensor, and bf16 at tp 4 after 13).
TEST_F(TensorParallelTest, Fp8GenerationMatchesTp1) {
  const int V = tiny_->config().vocab_size;
  const std::vector<std::vector<int32_t>> prompts = {tokens(11, 4, V), tokens(5, 6, V)};
  for (KvScheme scheme : {KvScheme::kFp8PerHead, KvScheme::kFp8PerTensor}) {
    const QuantType qt =
        scheme == KvScheme::kFp8PerHead ? QuantType::kPerHead : QuantType::kPerTensor;
    const CalibData calib =
        calibrate(*tiny_, *backend_, *ops_, calib_data(), calib_options(qt, nullptr)).data;
    RunnerOptions o = small(scheme);
    o.scales = slice_for_rank(calib, 1, 0);
    ModelRunner ref(*tiny_, *backend_, *ops_, o);
    const auto want = ref.generate(prompts, 10);
    std::vector<std::vector<std::vector<int32_t>>> got(2);
    on_ranks(2, [&](const Model& m, Backend& b, ModelOps& ops, Communicator& comm) {
      RunnerOptions ro = small(scheme);
      ro.scales = slice_for_rank(calib, 2, comm.rank());
      ro.comm = &comm;
      ModelRunner runner(m, b, ops, ro);
      got[comm.rank()] = runner.generate(prompts, 10);
    });
    EXPECT_EQ(got[0], want) << scheme_name(scheme);
    EXPECT_EQ(got[1], want) << scheme_name(scheme);
  }
}

TEST(TensorParallel, ExactTpChunksDivideHeadsAndIntermediate) {
  ModelConfig c;
  c.num_q_heads = 32;
  c.intermediate_size = 14336;  // Llama 3 8B: 2^11 * 7
  EXPECT_EQ(exact_tp_chunks(c), 8);
  c.num_q_heads = 12;
  EXPECT_EQ(exact_tp_chunks(c), 4);
  c.intermediate_size = 4866;  // 2 * 3 * 811
  EXPECT_EQ(exact_tp_chunks(c), 2);
}

}  // namespace
}  // namespace fp8kv
