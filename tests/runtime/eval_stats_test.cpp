// AttentionErrorStats: the per-(layer, KV head) attention error and its per-layer sum, and the
// eval table's per-head lines.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "fp8kv/error.h"
#include "fp8kv/fp8.h"
#include "fp8kv/model.h"
#include "fp8kv/workflows.h"

namespace fp8kv {
namespace {

constexpr int kRows = 5, kHq = 8, kHkv = 2, kD = 16;  // GQA group of 4
constexpr size_t kN = static_cast<size_t>(kRows) * kHq * kD;

// [rows, Hq * D] bf16 values in [-2, 2).
std::vector<uint16_t> random_outputs(uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-2.0f, 2.0f);
  std::vector<uint16_t> v(kN);
  for (auto& x : v) x = float_to_bf16(u(rng));
  return v;
}

// `main` with every element of Q heads [q_begin, q_end) moved by a little noise.
std::vector<uint16_t> perturbed(const std::vector<uint16_t>& main, int q_begin, int q_end,
                                uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-0.1f, 0.1f);
  std::vector<uint16_t> v = main;
  for (int t = 0; t < kRows; ++t) {
    for (int q = q_begin; q < q_end; ++q) {
      for (int e = 0; e < kD; ++e) {
        uint16_t& x = v[static_cast<size_t>((t * kHq + q) * kD + e)];
        x = float_to_bf16(bf16_to_float(x) + u(rng));
      }
    }
  }
  return v;
}

TEST(AttentionErrorStats, PerHeadSumsAddUpToTheLayer) {
  const std::vector<uint16_t> main = random_outputs(1);
  const std::vector<uint16_t> shadow = perturbed(main, 0, kHq, 2);
  AttentionErrorStats st(KvScheme::kFp8PerTensor, 3, kHkv);
  st.add(1, main.data(), shadow.data(), kRows, kHq, kHkv, 0, kD);
  // The whole layer, summed here element by element in one order.
  double diff = 0, ref = 0;
  for (size_t i = 0; i < kN; ++i) {
    const double r = bf16_to_float(main[i]), d = bf16_to_float(shadow[i]) - r;
    diff += d * d;
    ref += r * r;
  }
  // Relative 1e-12: the same terms, summed per head first (double rounding only).
  EXPECT_NEAR(st.diff_sq[1], diff, 1e-12 * diff);
  EXPECT_NEAR(st.ref_sq[1], ref, 1e-12 * ref);
  const double head_diff = st.head_diff_sq[1 * kHkv + 0] + st.head_diff_sq[1 * kHkv + 1];
  const double head_ref = st.head_ref_sq[1 * kHkv + 0] + st.head_ref_sq[1 * kHkv + 1];
  EXPECT_NEAR(head_diff, diff, 1e-12 * diff);
  EXPECT_NEAR(head_ref, ref, 1e-12 * ref);
  // error(layer)^2 * ||ref||^2 = sum over heads of the heads' numerators.
  EXPECT_NEAR(st.rel_error(1) * st.rel_error(1) * st.ref_sq[1], head_diff, 1e-12 * diff);
  for (int h = 0; h < kHkv; ++h) {
    EXPECT_GT(st.head_rel_error(1, h), 0.0);
    const size_t i = static_cast<size_t>(1 * kHkv + h);
    EXPECT_DOUBLE_EQ(st.head_rel_error(1, h), std::sqrt(st.head_diff_sq[i] / st.head_ref_sq[i]));
  }
  // The other layers saw nothing.
  for (int l : {0, 2}) {
    EXPECT_EQ(st.diff_sq[static_cast<size_t>(l)], 0.0);
    EXPECT_EQ(st.head_ref_sq[static_cast<size_t>(l * kHkv + 1)], 0.0);
  }
}

TEST(AttentionErrorStats, AnErrorInOneGroupShowsOnlyInItsKvHead) {
  const std::vector<uint16_t> main = random_outputs(3);
  // Q heads 4-7 read KV head 1.
  const std::vector<uint16_t> shadow = perturbed(main, 4, 8, 4);
  AttentionErrorStats st(KvScheme::kFp8PerHead, 1, kHkv);
  st.add(0, main.data(), shadow.data(), kRows, kHq, kHkv, 0, kD);
  EXPECT_EQ(st.head_diff_sq[0], 0.0);
  EXPECT_EQ(st.head_rel_error(0, 0), 0.0);
  EXPECT_GT(st.head_rel_error(0, 1), 1e-3);
  EXPECT_GT(st.head_ref_sq[0], 0.0);  // head 0's outputs still count in ||ref||
  EXPECT_EQ(st.diff_sq[0], st.head_diff_sq[1]);
  // The layer's error is diluted by head 0's share of ||ref||.
  EXPECT_LT(st.rel_error(0), st.head_rel_error(0, 1));
}

// A tensor-parallel rank accounts its slice into the model's KV heads; the ranks' sums (what
// evaluate adds over ranks) equal the whole model's.
TEST(AttentionErrorStats, RankSlicesLandOnTheModelsKvHeads) {
  const std::vector<uint16_t> main = random_outputs(5);
  const std::vector<uint16_t> shadow = perturbed(main, 0, kHq, 6);
  AttentionErrorStats whole(KvScheme::kFp8PerHead, 1, kHkv);
  whole.add(0, main.data(), shadow.data(), kRows, kHq, kHkv, 0, kD);
  for (int tp : {2, 4}) {  // tp = 4: each KV head is held by two ranks (TpShard replication)
    AttentionErrorStats ranks(KvScheme::kFp8PerHead, 1, kHkv);
    const int q_heads = kHq / tp, kv_heads = std::max(1, kHkv / tp);
    for (int rank = 0; rank < tp; ++rank) {
      const TpShard s = make_tp_shard(
          [] {
            ModelConfig c;
            c.hidden_size = 64;
            c.intermediate_size = 64;
            c.num_layers = 1;
            c.num_q_heads = kHq;
            c.num_kv_heads = kHkv;
            c.head_dim = kD;
            c.vocab_size = 16;
            return c;
          }(),
          tp, rank);
      ASSERT_EQ(s.q_heads, q_heads);
      ASSERT_EQ(s.kv_heads, kv_heads);
      // The rank's columns: Q heads [rank * q_heads, (rank + 1) * q_heads) of every row.
      std::vector<uint16_t> m, sh;
      for (int t = 0; t < kRows; ++t) {
        const size_t begin = static_cast<size_t>((t * kHq + s.q_head_begin) * kD);
        const size_t end = begin + static_cast<size_t>(q_heads * kD);
        m.insert(m.end(), main.begin() + begin, main.begin() + end);
        sh.insert(sh.end(), shadow.begin() + begin, shadow.begin() + end);
      }
      ranks.add(0, m.data(), sh.data(), kRows, q_heads, kv_heads, s.kv_head_begin, kD);
    }
    for (int h = 0; h < kHkv; ++h) {
      // Relative 1e-12: tp = 4 sums a head's group in two parts (double rounding only).
      EXPECT_NEAR(ranks.head_rel_error(0, h), whole.head_rel_error(0, h),
                  1e-12 * whole.head_rel_error(0, h))
          << "tp " << tp << " KV head " << h;
    }
    EXPECT_NEAR(ranks.rel_error(0), whole.rel_error(0), 1e-12 * whole.rel_error(0));
  }
}

TEST(AttentionErrorStats, HeadsThatDoNotFitAreRefusedAndChangeNothing) {
  const std::vector<uint16_t> main = random_outputs(7);
  AttentionErrorStats st(KvScheme::kFp8PerHead, 2, kHkv);
  auto refused = [&](int layer, int q_heads, int kv_heads, int kv_begin, const char* what) {
    try {
      st.add(layer, main.data(), main.data(), kRows, q_heads, kv_heads, kv_begin, kD);
      ADD_FAILURE() << "accepted " << what;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
  };
  refused(0, 8, 3, 0, "8 Q heads");  // 3 KV heads do not divide 8 Q heads
  refused(0, 8, 2, 1, "[1, 3)");     // past the model's 2 KV heads
  refused(2, 8, 2, 0, "layer 2");
  for (double x : st.head_diff_sq) EXPECT_EQ(x, 0.0);
  for (double x : st.ref_sq) EXPECT_EQ(x, 0.0);
  EXPECT_THROW(AttentionErrorStats(KvScheme::kFp8PerHead, 2, 0), Error);
}

TEST(EvalTable, ShowsEachLayersWorstKvHeadAndTheFullGrid) {
  EvalResult r;
  r.schemes.resize(2);
  r.schemes[0].scheme = KvScheme::kBf16;
  r.schemes[0].attn_rel_error = {0.0, 0.0};
  r.schemes[0].head_attn_rel_error = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  r.schemes[0].num_kv_heads = 3;
  SchemeEval& e = r.schemes[1];
  e.scheme = KvScheme::kFp8PerHead;
  e.num_kv_heads = 3;
  e.attn_rel_error = {0.02, 0.05};
  e.head_attn_rel_error = {0.01, 0.03, 0.02,   // layer 0: worst is head 1
                           0.07, 0.04, 0.06};  // layer 1: worst is head 0
  const std::string table = format_eval_table(r);
  EXPECT_NE(table.find("worst KV head"), std::string::npos) << table;
  EXPECT_NE(table.find("h1 3.000e-02"), std::string::npos) << table;
  EXPECT_NE(table.find("h0 7.000e-02"), std::string::npos) << table;
  const std::string grid = format_eval_heads(r);
  EXPECT_NE(grid.find("fp8-per-head"), std::string::npos) << grid;
  EXPECT_EQ(grid.find("bf16"), std::string::npos) << grid;  // the reference has no grid
  EXPECT_NE(grid.find("    1   7.000e-02   4.000e-02   6.000e-02"), std::string::npos) << grid;
}

}  // namespace
}  // namespace fp8kv
