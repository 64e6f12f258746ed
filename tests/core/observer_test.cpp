// The calibration observer: warmup/count, per-head and per-tensor abs-max, finalize through a
// Communicator (single process and an in-process multi-rank double), non-finite refusal.
#include "fp8kv/observer.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "fp8kv/error.h"
#include "fp8kv/fp8.h"
#include "threaded_communicator.h"

namespace fp8kv {
namespace {

ObserverConfig config(int layers, int heads, QuantType type, int warmup, int count) {
  ObserverConfig c;
  c.num_layers = layers;
  c.num_kv_heads = heads;
  c.quant_type = type;
  c.warmup = warmup;
  c.count = count;
  return c;
}

TEST(Observer, DefaultsAreWarmup0Count4000) {
  ObserverConfig c;
  EXPECT_EQ(c.warmup, 0);
  EXPECT_EQ(c.count, 4000);
}

TEST(Observer, WarmupPassesAreDroppedAndCountPassesKept) {
  Observer obs(config(1, 1, QuantType::kPerHead, /*warmup=*/2, /*count=*/2));
  const float warm[2] = {100.0f, 100.0f};  // seen during warmup: must not count
  const float a[2] = {1.0f, 2.0f};
  const float b[2] = {3.0f, -0.5f};      // abs-max: |−0.5| < 2
  const float late[2] = {50.0f, 50.0f};  // after count: must not count
  EXPECT_FALSE(obs.wants(0));
  obs.record(0, warm);
  obs.record(0, warm);
  EXPECT_TRUE(obs.wants(0));
  obs.record(0, a);
  EXPECT_FALSE(obs.done());
  obs.record(0, b);
  EXPECT_TRUE(obs.done());
  EXPECT_FALSE(obs.wants(0));
  obs.record(0, late);
  EXPECT_EQ(obs.passes_seen(0), 5);
  auto comm = make_single_communicator();
  const CalibData d = obs.finalize(*comm, "LlamaForCausalLM");
  ASSERT_EQ(d.scales.size(), 2u);
  EXPECT_EQ(d.scales[0], 3.0f / kE4m3Max);
  EXPECT_EQ(d.scales[1], 2.0f / kE4m3Max);
  EXPECT_EQ(d.num_head, 1);
  EXPECT_EQ(d.architectures, "LlamaForCausalLM");
}

TEST(Observer, DoneNeedsEveryLayer) {
  Observer obs(config(3, 1, QuantType::kPerTensor, 0, 1));
  const float a[2] = {1.0f, 1.0f};
  obs.record(0, a);
  obs.record(2, a);
  EXPECT_FALSE(obs.done());
  obs.record(1, a);
  EXPECT_TRUE(obs.done());
}

TEST(Observer, ZeroAmaxGivesScaleOne) {
  Observer obs(config(1, 2, QuantType::kPerHead, 0, 1));
  const float a[4] = {0.0f, 448.0f, 0.0f, 0.0f};
  obs.record(0, a);
  auto comm = make_single_communicator();
  const CalibData d = obs.finalize(*comm, "X");
  EXPECT_EQ(d.scales, (std::vector<float>{1.0f, 1.0f, 1.0f, 1.0f}));
}

TEST(Observer, PerTensorTakesMaxOverHeads) {
  Observer obs(config(2, 3, QuantType::kPerTensor, 0, 1));
  const float l0[6] = {1, 5, 2, 0.5f, 0.25f, 4};  // K heads 1 5 2, V heads 0.5 0.25 4
  const float l1[6] = {0, 0, 0, 7, 0, 0};
  obs.record(0, l0);
  obs.record(1, l1);
  auto comm = make_single_communicator();
  const CalibData d = obs.finalize(*comm, "X");
  ASSERT_EQ(d.scales.size(), 4u);
  EXPECT_EQ(d.scales[0], 5.0f / 448.0f);
  EXPECT_EQ(d.scales[1], 4.0f / 448.0f);
  EXPECT_EQ(d.scales[2], 1.0f);  // K of layer 1 never moved: 0 -> 1
  EXPECT_EQ(d.scales[3], 7.0f / 448.0f);
  EXPECT_EQ(d.row_width(), 2);
}

TEST(Observer, NonFiniteIsRefusedNamingLayerAndHead) {
  for (float bad : {NAN, INFINITY}) {
    Observer obs(config(2, 2, QuantType::kPerHead, 0, 2));
    const float ok[4] = {1, 1, 1, 1};
    const float poisoned[4] = {1, 1, 1, bad};  // V head 1 of layer 1
    obs.record(0, ok);
    obs.record(1, poisoned);
    obs.record(0, ok);
    obs.record(1, ok);  // a later finite pass must not hide the NaN
    auto comm = make_single_communicator();
    try {
      obs.finalize(*comm, "X");
      FAIL() << "non-finite accepted";
    } catch (const Error& e) {
      const std::string m = e.what();
      EXPECT_NE(m.find("layer 1"), std::string::npos) << m;
      EXPECT_NE(m.find("V head 1"), std::string::npos) << m;
    }
  }
}

TEST(Observer, BadConfigAndLayerRefused) {
  EXPECT_THROW(Observer(config(0, 1, QuantType::kPerHead, 0, 1)), Error);
  EXPECT_THROW(Observer(config(1, 0, QuantType::kPerHead, 0, 1)), Error);
  EXPECT_THROW(Observer(config(1, 1, QuantType::kPerHead, -1, 1)), Error);
  Observer obs(config(1, 1, QuantType::kPerHead, 0, 1));
  const float a[2] = {1, 1};
  EXPECT_THROW(obs.record(1, a), Error);
}

TEST(Observer, EnvironmentOverridesDefaults) {
  ObserverConfig base;
  setenv("FP8KV_CALIB_WARMUP", "3", 1);
  setenv("FP8KV_CALIB_COUNT", "17", 1);
  ObserverConfig c = observer_config_from_env(base);
  EXPECT_EQ(c.warmup, 3);
  EXPECT_EQ(c.count, 17);
  setenv("FP8KV_CALIB_COUNT", "12x", 1);
  try {
    observer_config_from_env(base);
    FAIL() << "12x accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("FP8KV_CALIB_COUNT"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("12x"), std::string::npos);
  }
  setenv("FP8KV_CALIB_COUNT", "-1", 1);
  EXPECT_THROW(observer_config_from_env(base), Error);
  unsetenv("FP8KV_CALIB_WARMUP");
  unsetenv("FP8KV_CALIB_COUNT");
  c = observer_config_from_env(base);
  EXPECT_EQ(c.warmup, 0);
  EXPECT_EQ(c.count, 4000);
}

// Tensor parallel: each rank observes its own heads; per-head finalize must put them back in
// global order, per-tensor must take the max, and both must equal a one-rank run over all heads.
TEST(Observer, MultiRankFinalizeEqualsSingleRank) {
  constexpr int kLayers = 3, kHeads = 8, kPasses = 4;
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> dist(-5.0f, 5.0f);
  // amax[pass][layer][2 * kHeads], global head order (K heads then V heads).
  std::vector<float> data(static_cast<size_t>(kPasses) * kLayers * 2 * kHeads);
  for (auto& x : data) x = dist(rng);
  auto at = [&](int pass, int layer) {
    return data.data() + (pass * kLayers + layer) * 2 * kHeads;
  };

  for (QuantType type : {QuantType::kPerHead, QuantType::kPerTensor}) {
    Observer whole(config(kLayers, kHeads, type, 1, kPasses - 1));
    for (int p = 0; p < kPasses; ++p)
      for (int l = 0; l < kLayers; ++l) whole.record(l, at(p, l));
    auto single = make_single_communicator();
    const CalibData expected = whole.finalize(*single, "LlamaForCausalLM");

    for (int tp : {2, 4, 8}) {
      const int h = kHeads / tp;
      std::vector<CalibData> results(tp);
      testing::ThreadedGroup group(tp);
      group.run([&](Communicator& comm) {
        Observer part(config(kLayers, h, type, 1, kPasses - 1));
        std::vector<float> local(2 * h);
        for (int p = 0; p < kPasses; ++p) {
          for (int l = 0; l < kLayers; ++l) {
            const float* row = at(p, l);
            for (int i = 0; i < h; ++i) {
              local[i] = row[comm.rank() * h + i];
              local[h + i] = row[kHeads + comm.rank() * h + i];
            }
            part.record(l, local.data());
          }
        }
        results[comm.rank()] = part.finalize(comm, "LlamaForCausalLM");
      });
      for (int r = 0; r < tp; ++r) {
        EXPECT_EQ(results[r].num_head, kHeads) << "tp " << tp;
        EXPECT_EQ(results[r].scales, expected.scales) << "tp " << tp << " rank " << r;
      }
    }
  }
}

// Ranks outnumber KV heads: 8 ranks over 2 heads, each head replicated on 4 ranks.
TEST(Observer, ReplicatedHeadsGatherBackToGlobalHeads) {
  constexpr int kHeads = 2, kTp = 8;
  const float global_row[4] = {1.0f, 2.0f, 3.0f, 4.0f};  // K0 K1 V0 V1
  std::vector<CalibData> results(kTp);
  testing::ThreadedGroup group(kTp);
  group.run([&](Communicator& comm) {
    ObserverConfig c = config(1, 1, QuantType::kPerHead, 0, 1);
    c.total_kv_heads = kHeads;
    Observer part(c);
    const int head = comm.rank() / (kTp / kHeads);
    const float local[2] = {global_row[head], global_row[kHeads + head]};
    part.record(0, local);
    results[comm.rank()] = part.finalize(comm, "X");
  });
  for (const CalibData& d : results) {
    EXPECT_EQ(d.num_head, kHeads);
    EXPECT_EQ(d.scales, (std::vector<float>{1 / 448.0f, 2 / 448.0f, 3 / 448.0f, 4 / 448.0f}));
  }
}

// Q scales: the same warmup / count as K/V, one abs-max per (layer, KV head), scale amax / 448
// (0 -> 1) into q_calibration; refused for per_tensor and without a Q abs-max.
TEST(Observer, QScalesFollowTheKvPasses) {
  ObserverConfig c = config(2, 2, QuantType::kPerHead, /*warmup=*/1, /*count=*/2);
  c.q_scales = true;
  Observer obs(c);
  const float kv[4] = {1.0f, 1.0f, 1.0f, 1.0f};
  const float warm_q[2] = {1000.0f, 1000.0f};  // warmup: dropped
  const float q1[2] = {3.0f, -7.5f};
  const float q2[2] = {-5.0f, 2.0f};
  const float late_q[2] = {900.0f, 900.0f};  // after count: dropped
  for (int l = 0; l < 2; ++l) obs.record(l, kv, warm_q);
  obs.record(0, kv, q1);
  obs.record(0, kv, q2);
  obs.record(0, kv, late_q);
  const float zero[2] = {0.0f, 0.0f};
  obs.record(1, kv, zero);
  obs.record(1, kv, zero);
  EXPECT_TRUE(obs.done());
  EXPECT_THROW(obs.record(1, kv), Error);  // no Q abs-max for an observer of Q scales
  auto comm = make_single_communicator();
  const CalibData d = obs.finalize(*comm, "X");
  ASSERT_TRUE(d.q_scales.has_value());
  EXPECT_EQ(d.q_scales->num_head, 2);
  EXPECT_EQ(d.q_scales->scales, (std::vector<float>{5.0f / kE4m3Max, 7.5f / kE4m3Max, 1.0f, 1.0f}));

  // Without q_scales, no q_calibration; per_tensor refuses Q scales.
  Observer kv_only(config(1, 2, QuantType::kPerHead, 0, 1));
  kv_only.record(0, kv);
  EXPECT_FALSE(kv_only.finalize(*comm, "X").q_scales.has_value());
  ObserverConfig pt = config(1, 2, QuantType::kPerTensor, 0, 1);
  pt.q_scales = true;
  EXPECT_THROW({ Observer bad(pt); }, Error);
}

TEST(Observer, NonFiniteQIsRefusedNamingLayerAndHead) {
  ObserverConfig c = config(2, 2, QuantType::kPerHead, 0, 1);
  c.q_scales = true;
  Observer obs(c);
  const float kv[4] = {1.0f, 1.0f, 1.0f, 1.0f};
  const float q_ok[2] = {1.0f, 1.0f};
  const float q_nan[2] = {1.0f, NAN};
  obs.record(0, kv, q_ok);
  obs.record(1, kv, q_nan);
  auto comm = make_single_communicator();
  try {
    obs.finalize(*comm, "X");
    FAIL() << "expected an Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("layer 1, Q of KV head 1"), std::string::npos) << e.what();
  }
}

// Q scales over ranks: tp <= heads gathers heads; tp > heads (a KV head's query heads split
// over ranks) takes the max of the ranks' parts of the group, which is the whole group's.
TEST(Observer, QScalesOverRanksEqualOneRank) {
  constexpr int kHeads = 2;
  const float q_whole[kHeads] = {6.0f, 9.0f};
  for (int tp : {2, 4}) {
    std::vector<CalibData> results(tp);
    testing::ThreadedGroup group(tp);
    group.run([&](Communicator& comm) {
      const int h = std::max(1, kHeads / tp), f = tp * h / kHeads;
      ObserverConfig c = config(1, h, QuantType::kPerHead, 0, 1);
      c.total_kv_heads = kHeads;
      c.q_scales = true;
      Observer part(c);
      std::vector<float> local_kv(2 * h, 1.0f), local_q(h);
      for (int i = 0; i < h; ++i) {
        const int head = (comm.rank() * h + i) / f;
        // Rank k of a head's f ranks sees a part of its group whose max is the group's only on
        // the last of them.
        const int copy = comm.rank() % f;
        local_q[i] = copy == f - 1 ? q_whole[head] : q_whole[head] / (2 + copy);
      }
      part.record(0, local_kv.data(), local_q.data());
      results[comm.rank()] = part.finalize(comm, "X");
    });
    for (const CalibData& d : results) {
      ASSERT_TRUE(d.q_scales.has_value()) << "tp " << tp;
      EXPECT_EQ(d.q_scales->num_head, kHeads);
      EXPECT_EQ(d.q_scales->scales, (std::vector<float>{6.0f / kE4m3Max, 9.0f / kE4m3Max}))
          << "tp " << tp;
    }
  }
}

}  // namespace
}  // namespace fp8kv
