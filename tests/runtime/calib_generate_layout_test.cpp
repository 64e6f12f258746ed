// calibrate() on the tiny model (8 Q heads, 2 KV heads): both tensor-parallel layouts of the
// file from one run load to the same per-rank scales at tp 1, 2, 4, 8 (ranks as threads), and
// --generate's decode steps are observed and counted as passes.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "fp8kv/backend.h"
#include "fp8kv/calib.h"
#include "fp8kv/communicator.h"
#include "fp8kv/make_model.h"
#include "fp8kv/model.h"
#include "fp8kv/observer.h"
#include "fp8kv/threaded_communicator.h"
#include "fp8kv/workflows.h"
#include "runtime/test_util.h"

namespace fp8kv {
namespace {

std::vector<int32_t> tokens(int n, int seed, int vocab) {
  std::vector<int32_t> t;
  for (int i = 0; i < n; ++i) t.push_back(static_cast<int32_t>((seed * 7919 + i * 104729) % vocab));
  return t;
}

class CalibGenerateLayoutTest : public ::testing::Test {
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
  static TokenData data() {
    const int V = tiny_->config().vocab_size;
    return {tokens(11, 1, V), tokens(7, 2, V), tokens(9, 3, V)};
  }
  static CalibrateOptions options(QuantType qt, int generate, Communicator* comm = nullptr) {
    CalibrateOptions co;
    co.quant_type = qt;
    co.batch_size = 2;
    co.generate = generate;
    co.comm = comm;
    return co;
  }

  static TempDir* dir_;
  static std::string* model_dir_;
  static Backend* backend_;
  static ModelOps* ops_;
  static Model* tiny_;
};

TempDir* CalibGenerateLayoutTest::dir_ = nullptr;
std::string* CalibGenerateLayoutTest::model_dir_ = nullptr;
Backend* CalibGenerateLayoutTest::backend_ = nullptr;
ModelOps* CalibGenerateLayoutTest::ops_ = nullptr;
Model* CalibGenerateLayoutTest::tiny_ = nullptr;

// One calibration run at each tp (its rank 0 result), written in both layouts; every rank of
// that tp loads each file through load_scales_for_model (the model's checks, the merge of a
// per-rank file) and gets the same scales from both -- and, with exact_tp, tp 1's.
TEST_F(CalibGenerateLayoutTest, BothLayoutsFromOneRunLoadToTheSameRankScales) {
  const ModelConfig& config = tiny_->config();
  ASSERT_EQ(config.num_kv_heads, 2);
  for (QuantType qt : {QuantType::kPerHead, QuantType::kPerTensor}) {
    const KvScheme scheme =
        qt == QuantType::kPerHead ? KvScheme::kFp8PerHead : KvScheme::kFp8PerTensor;
    const CalibData tp1 = calibrate(*tiny_, *backend_, *ops_, data(), options(qt, 0)).data;
    // per_tensor has no heads to lay out: tp 8 alone shows its num_head written and merged.
    const std::vector<int> tps =
        qt == QuantType::kPerHead ? std::vector<int>{1, 2, 4, 8} : std::vector<int>{8};
    for (int tp : tps) {
      CalibData run;
      if (tp == 1) {
        run = tp1;
      } else {
        run_ranks(tp, [&](Communicator& comm) {
          auto backend = make_cpu_backend();
          auto ops = make_cpu_model_ops();
          auto m = Model::load(*model_dir_, *backend, false, WeightDtype::kF32, tp, comm.rank());
          CalibData d = calibrate(*m, *backend, *ops, data(), options(qt, 0, &comm)).data;
          if (comm.rank() == 0) run = std::move(d);
        });
      }
      const std::string merged = dir_->path() + "/merged.json";
      const std::string per_rank = dir_->path() + "/per_rank.json";
      write_calib(merged, run);
      const CalibData rank_file = to_rank_layout(run, tp);
      write_calib(per_rank, rank_file);
      EXPECT_EQ(load_calib(per_rank).num_head, tp > 2 ? tp : 2) << "tp " << tp;
      for (int r = 0; r < tp; ++r) {
        const TpShard shard = make_tp_shard(config, tp, r);
        const RankScales a = load_scales_for_model(merged, config, scheme, shard);
        const RankScales b = load_scales_for_model(per_rank, config, scheme, shard);
        const RankScales want = slice_for_rank(tp1, tp, r);
        EXPECT_EQ(a.kv, b.kv) << quant_type_name(qt) << " tp " << tp << " rank " << r;
        EXPECT_EQ(a.kv, want.kv) << quant_type_name(qt) << " tp " << tp << " rank " << r;
        EXPECT_EQ(a.heads_per_rank, shard.kv_heads);
      }
    }
  }
}

// The decode steps are passes: 3 sequences in batches of 2 give 2 batches x (1 + 3) passes;
// every K/V the prefill-only run saw is seen again, plus the generated tokens' (scales can only
// grow), and some scale does grow.
TEST_F(CalibGenerateLayoutTest, GenerateObservesDecodeSteps) {
  const CalibrateResult plain =
      calibrate(*tiny_, *backend_, *ops_, data(), options(QuantType::kPerHead, 0));
  const CalibrateResult gen =
      calibrate(*tiny_, *backend_, *ops_, data(), options(QuantType::kPerHead, 3));
  EXPECT_EQ(plain.passes_run, 2);
  EXPECT_EQ(plain.decode_passes, 0);
  EXPECT_EQ(gen.count, 8);  // the default count: every pass the data gives
  EXPECT_EQ(gen.passes_run, 8);
  EXPECT_EQ(gen.decode_passes, 6);
  EXPECT_EQ(gen.tokens, plain.tokens + 2 * 3 + 1 * 3);  // batch sizes 2 and 1, 3 steps each
  ASSERT_EQ(gen.data.scales.size(), plain.data.scales.size());
  int grew = 0;
  for (size_t i = 0; i < plain.data.scales.size(); ++i) {
    EXPECT_GE(gen.data.scales[i], plain.data.scales[i]) << "column " << i;
    grew += gen.data.scales[i] > plain.data.scales[i];
  }
  EXPECT_GT(grew, 0);

  // More passes than the data gives is refused, saying how the passes were counted.
  CalibrateOptions too_many = options(QuantType::kPerHead, 3);
  too_many.count = 9;
  const std::string msg = error_of([&] { calibrate(*tiny_, *backend_, *ops_, data(), too_many); });
  EXPECT_NE(msg.find("the data gives 8 forward passes"), std::string::npos) << msg;
  EXPECT_NE(msg.find("x (1 prefill + 3 decode steps)"), std::string::npos) << msg;
}

// warmup 1, count 1 with --generate observes exactly the first decode step of the first batch:
// the same scales as a runner whose observer sees that one step after a greedy prefill.
TEST_F(CalibGenerateLayoutTest, WarmupAndCountCountDecodeSteps) {
  CalibrateOptions co = options(QuantType::kPerHead, 2);
  co.warmup = 1;
  co.count = 1;
  const CalibrateResult got = calibrate(*tiny_, *backend_, *ops_, data(), co);
  EXPECT_EQ(got.passes_run, 2);
  EXPECT_EQ(got.decode_passes, 1);
  EXPECT_EQ(got.warmup_source, "--warmup");
  EXPECT_EQ(got.count_source, "--count");

  const ModelConfig& c = tiny_->config();
  ObserverConfig oc;
  oc.num_layers = c.num_layers;
  oc.num_kv_heads = c.num_kv_heads;
  oc.warmup = 1;
  oc.count = 1;
  Observer observer(oc);
  RunnerOptions ro;
  ro.observer = &observer;
  ro.num_slots = 64;
  ro.max_requests = 2;
  ro.max_len = 32;
  ro.exact_tp = true;  // as calibrate() runs
  ModelRunner runner(*tiny_, *backend_, *ops_, ro);
  const TokenData d = data();
  const std::vector<int> reqs = {runner.add_request(), runner.add_request()};
  const std::vector<int32_t> next = runner.forward_greedy(reqs, {d[0], d[1]});
  runner.forward_greedy(reqs, {{next[0]}, {next[1]}});
  ASSERT_TRUE(observer.done());
  auto single = make_single_communicator();
  const CalibData want = observer.finalize(*single, c.architecture);
  EXPECT_EQ(got.data.scales, want.scales);
}

// The decode steps at tp 2 and 8 (exact_tp) give tp 1's file.
TEST_F(CalibGenerateLayoutTest, GenerateAtTpMatchesTp1) {
  const CalibData want =
      calibrate(*tiny_, *backend_, *ops_, data(), options(QuantType::kPerHead, 2)).data;
  for (int tp : {2, 8}) {
    CalibData got;
    run_ranks(tp, [&](Communicator& comm) {
      auto backend = make_cpu_backend();
      auto ops = make_cpu_model_ops();
      auto m = Model::load(*model_dir_, *backend, false, WeightDtype::kF32, tp, comm.rank());
      CalibData d =
          calibrate(*m, *backend, *ops, data(), options(QuantType::kPerHead, 2, &comm)).data;
      if (comm.rank() == 0) got = std::move(d);
    });
    EXPECT_EQ(got.scales, want.scales) << "tp " << tp;
  }
}

// LightLLM's variable names reach calibrate(), and the result says which one it used.
TEST_F(CalibGenerateLayoutTest, LightLlmEnvironmentNames) {
  ::setenv("LIGHTLLM_KV_QUANT_CALIBRARTION_INFERENCE_COUNT", "1", 1);
  ::setenv("KV_QUANT_CALIBRATION_WARMUP_COUNT", "1", 1);
  const CalibrateResult r =
      calibrate(*tiny_, *backend_, *ops_, data(), options(QuantType::kPerTensor, 0));
  ::unsetenv("LIGHTLLM_KV_QUANT_CALIBRARTION_INFERENCE_COUNT");
  ::unsetenv("KV_QUANT_CALIBRATION_WARMUP_COUNT");
  EXPECT_EQ(r.count, 1);
  EXPECT_EQ(r.warmup, 1);
  EXPECT_EQ(r.passes_run, 2);
  EXPECT_EQ(r.count_source, "LIGHTLLM_KV_QUANT_CALIBRARTION_INFERENCE_COUNT=1 (LightLLM's name)");
  EXPECT_EQ(r.warmup_source, "KV_QUANT_CALIBRATION_WARMUP_COUNT=1 (LightLLM's name)");

  // A warmup with no count: the count is what the data gives after it (2 batches x 3 passes).
  ::setenv("LIGHTLLM_KV_QUANT_CALIBRATION_WARMUP_COUNT", "2", 1);
  const CalibrateResult rest =
      calibrate(*tiny_, *backend_, *ops_, data(), options(QuantType::kPerTensor, 2));
  ::unsetenv("LIGHTLLM_KV_QUANT_CALIBRATION_WARMUP_COUNT");
  EXPECT_EQ(rest.warmup, 2);
  EXPECT_EQ(rest.count, 4);
  EXPECT_EQ(rest.passes_run, 6);
  EXPECT_EQ(rest.count_source, "default: every pass the data gives after the warmup");
}

}  // namespace
}  // namespace fp8kv
