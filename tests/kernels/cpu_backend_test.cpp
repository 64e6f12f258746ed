// The CPU backend (src/kernels/cpu/cpu_backend.cpp) against float64 references.
//
// Error metrics (tests/kernel_test_util.h): normalized error ||o - ref|| / ||ref|| over the
// whole output, and the largest per-row normalized error (a row: one token and query head).
// Two references: "exact" is float64 attention on the bf16 inputs; "emulated" is float64
// attention on the inputs after the scheme's FP8 rounding (K/V with their scales, Q with its
// dynamic scale for fp8-per-head), which isolates the kernel's own error from the input
// quantization it is designed to have.
//
// Bounds and why (u = 2^-4, the worst relative rounding error of e4m3 with 3 mantissa bits; a
// uniform rounding error has RMS about u / sqrt(3) = 0.036 relative; bf16 output rounding is
// at most 2^-9 = 2.0e-3 relative per element):
//  - bf16 vs exact, fp8-per-tensor vs emulated: the same inputs, fp32 accumulation (~1e-6) and
//    bf16 output rounding (<= 2^-9 per element, so per row too): kBf16Bound = 4e-3 on both the
//    normalized and the max-row error (2x margin).
//  - fp8-per-head vs emulated: adds the rounding of P to e4m3 for the PV product. Each weight
//    gets an unbiased relative error of RMS ~u/sqrt(3), so the output row, a weighted average of
//    V rows, gets about that relative to its own size (see the bound in cpu_backend.cpp): at
//    most ~0.036, measured 0.003-0.032 normalized and <= 0.04 per row; bound u = 0.0625
//    normalized, 2u per row.
//  - fp8 vs exact: Q (per-head), K and V are rounded. V alone gives ~u/sqrt(3) = 0.036. K and Q
//    perturb each logit by sigma_s ~ (u/sqrt(3)) * logit_std * sqrt(2) ~ 0.1 (logit_std 2 in
//    these tests), which moves each softmax weight by that relative amount; the output moves
//    by ~sigma_s * ||v_j - o|| / ||o||, and ||v_j - o|| exceeds ||o|| when o averages a few
//    rows. Measured 0.03-0.10 normalized; bound 3u = 0.19. Per row, a few short rows with
//    several comparable keys reach 0.38; bound 8u = 0.5. (These are statistical bounds for
//    this data, not worst cases: a worst case grows with the logits' range.)
//  - fp8-per-head-bf16q: fp8-per-head's K/V bytes, bf16 Q and fp32 P: vs emulated it is exact
//    up to fp32 accumulation and the bf16 output, like fp8-per-tensor (kBf16Bound); vs exact it
//    keeps fp8-per-tensor's bounds (K and V rounded, Q not).
//  - fp8-e5m2 (u5 = 2^-3, two mantissa bits, no scale): vs emulated kBf16Bound (K/V decode
//    exactly); vs exact, V gives ~u5/sqrt(3) = 0.072 and K moves each logit by ~(u5/sqrt(3)) *
//    logit_std ~ 0.14: twice fp8-per-tensor's figures, so twice its bounds (6u = 0.375
//    normalized, 16u = 1.0 per row: a short row averaging few keys can move by its own size).
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <iterator>
#include <limits>
#include <string>
#include <vector>

#include "fp8kv/backend.h"
#include "fp8kv/error.h"
#include "fp8kv/fp8.h"
#include "kernel_test_util.h"

namespace fp8kv {
namespace {

constexpr double kU = 0.0625;  // 2^-4
constexpr double kBf16Bound = 4e-3;

struct Bounds {
  double normalized;
  double max_row;
};
// vs the float64 reference on the exact bf16 inputs
Bounds exact_bound(KvScheme s) {
  switch (kv_codec(s)) {
    case KvCodec::kBf16:
      return {kBf16Bound, kBf16Bound};
    case KvCodec::kE5m2:
      return {6 * kU, 16 * kU};
    case KvCodec::kE4m3:
      break;
  }
  return {3 * kU, 8 * kU};
}
// vs the float64 reference on the FP8-rounded inputs: P's e4m3 rounding where the twin rounds it
// (fp8_p: fp8-per-head, and fp8-per-tensor's prefill at head_dim 128)
Bounds emulated_bound(KvScheme s, AttentionPhase phase, int head_dim) {
  return fp8_p(s, phase == AttentionPhase::kPrefill, head_dim) ? Bounds{kU, 2 * kU}
                                                               : Bounds{kBf16Bound, kBf16Bound};
}

const auto& kSchemes = kAllSchemes;

// Expects fn() to throw Error whose message contains `needle`.
template <typename Fn>
void expect_error(Fn fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "no Error; expected one containing '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)
        << "message '" << e.what() << "' lacks '" << needle << "'";
  }
}

// ---- quantize_kv ---------------------------------------------------------------------------

test::ProblemSpec small_spec() {
  test::ProblemSpec spec;
  spec.requests = {{3, 4}, {0, 5}};
  spec.num_q_heads = 8;
  spec.num_kv_heads = 2;
  spec.head_dim = 64;
  spec.data.head_range = 50.0f;
  spec.data.outlier_channels = 3;
  return spec;
}

TEST(CpuBackend, QuantizeKvWritesTheBytesOfQuantizeE4m3) {
  const test::AttentionProblem p = test::make_problem(small_spec());
  auto cpu = make_cpu_backend();
  const int Hkv = p.num_kv_heads, D = p.head_dim;
  const int64_t row_elems = 2 * Hkv * D;
  for (KvScheme scheme : kSchemes) {
    SCOPED_TRACE(scheme_name(scheme));
    const test::KvScales scales = test::calibrate_scales(p, scheme);
    const test::AttentionRun run = test::run_attention(*cpu, p, scheme, scales);
    std::vector<bool> used(p.num_slots + 1, false);
    for (int64_t t = 0; t < p.num_tokens(); ++t) {
      const int64_t slot = p.kv_slot[t];
      used[slot] = true;
      for (int head = 0; head < 2 * Hkv; ++head) {
        for (int d = 0; d < D; ++d) {
          const int64_t src = t * row_elems + head * D + d;
          const int64_t dst = slot * row_elems + head * D + d;
          if (scheme == KvScheme::kBf16) {
            uint16_t stored;
            std::memcpy(&stored, &run.pool[dst * 2], 2);
            ASSERT_EQ(stored, p.kv[src]) << "token " << t << " head " << head << " d " << d;
          } else if (kv_codec(scheme) == KvCodec::kE5m2) {
            ASSERT_TRUE(scales.k.empty() && scales.v.empty());  // no scales: scale 1
            ASSERT_EQ(run.pool[dst], float_to_e5m2(bf16_to_float(p.kv[src])))
                << "token " << t << " head " << head << " d " << d;
          } else {
            const std::vector<float>& s = head < Hkv ? scales.k : scales.v;
            const float scale =
                kv_scale_source(scheme) == KvScaleSource::kPerHead ? s[head % Hkv] : s[0];
            ASSERT_EQ(run.pool[dst], quantize_e4m3(bf16_to_float(p.kv[src]), scale))
                << "token " << t << " head " << head << " d " << d;
          }
        }
      }
    }
    // Spare slots and the padding slot keep their 0xff fill.
    const int64_t slot_bytes = row_elems * kv_elem_bytes(scheme);
    for (int64_t slot = 0; slot <= p.num_slots; ++slot) {
      if (used[slot]) continue;
      for (int64_t i = 0; i < slot_bytes; ++i) {
        ASSERT_EQ(run.pool[slot * slot_bytes + i], 0xff) << "unused slot " << slot << " written";
      }
    }
  }
}

// fp8-e5m2 takes no scales (null pointers are fine) and rounds K/V as they are, saturating at
// +-57344: beyond it (and infinities) the largest finite code, NaN the NaN code 0x7f.
TEST(CpuBackend, QuantizeKvE5m2NeedsNoScalesAndSaturates) {
  constexpr int kHkv = 1, kD = 64;
  const float inf = std::numeric_limits<float>::infinity();
  const float specials[] = {1.0f, -3.0f, 57344.0f, 60000.0f, -1e30f, inf, -inf, 1e-6f, 0.0f};
  std::vector<uint16_t> kv(2 * kHkv * kD, float_to_bf16(0.5f));
  for (size_t i = 0; i < std::size(specials); ++i) kv[i] = float_to_bf16(specials[i]);
  kv[kD + 1] = 0x7fc0;  // a NaN in V
  std::vector<uint8_t> pool(2 * 2 * kHkv * kD, 0xab);
  const std::vector<int32_t> slots = {0};
  QuantizeKvParams p;
  p.kv = kv.data();
  p.slots = slots.data();
  p.num_tokens = 1;
  p.cache = KvCacheLayer{pool.data(), 1, kHkv, kD, KvScheme::kFp8E5m2};
  auto cpu = make_cpu_backend();
  cpu->quantize_kv(p);       // scales.k / scales.v are null
  EXPECT_EQ(pool[0], 0x3c);  // 1.0
  EXPECT_EQ(pool[2], 0x7b);  // 57344, the largest finite
  EXPECT_EQ(pool[3], 0x7b);  // 60000 saturates
  EXPECT_EQ(pool[4], 0xfb);  // -1e30 saturates
  EXPECT_EQ(pool[5], 0x7b);  // +inf saturates
  EXPECT_EQ(pool[6], 0xfb);  // -inf saturates
  EXPECT_EQ(pool[8], 0x00);
  EXPECT_EQ(pool[kD + 1], 0x7f);  // NaN
  for (int i = 0; i < 2 * kD; ++i) {
    EXPECT_EQ(pool[i], float_to_e5m2(bf16_to_float(kv[i]))) << i;
  }
  for (size_t i = 2 * kD; i < pool.size(); ++i) ASSERT_EQ(pool[i], 0xab) << "padding slot written";
  // The per-head scheme with bf16 Q does need its scales.
  p.cache.scheme = KvScheme::kFp8PerHeadBf16Q;
  expect_error([&] { cpu->quantize_kv(p); },
               "scales.k is null: scheme fp8-per-head-bf16q needs K scales");
}

// Writes `tokens` rows of K/V into a fresh pool; returns nothing, the caller inspects.
struct KvFixture {
  static constexpr int kHkv = 2, kD = 64, kSlots = 8;
  std::unique_ptr<Backend> cpu = make_cpu_backend();
  std::vector<uint8_t> pool = std::vector<uint8_t>((kSlots + 1) * 2 * kHkv * kD, 0xab);
  std::vector<float> k_scale = {0.5f, 2.0f}, v_scale = {1.0f, 4.0f};
  QuantizeKvParams params(const std::vector<uint16_t>& kv, const std::vector<int32_t>& slots) {
    QuantizeKvParams p;
    p.kv = kv.data();
    p.slots = slots.data();
    p.num_tokens = static_cast<int64_t>(slots.size());
    p.cache.data = pool.data();
    p.cache.num_slots = kSlots;
    p.cache.num_kv_heads = kHkv;
    p.cache.head_dim = kD;
    p.cache.scheme = KvScheme::kFp8PerHead;
    p.scales.k = k_scale.data();
    p.scales.v = v_scale.data();
    return p;
  }
  static std::vector<uint16_t> random_kv(int tokens, uint64_t seed) {
    test::Rng rng(seed);
    std::vector<uint16_t> kv(static_cast<size_t>(tokens) * 2 * kHkv * kD);
    for (auto& x : kv) x = float_to_bf16(rng.normal() * 3.0f);
    return kv;
  }
};

TEST(CpuBackend, QuantizeKvRefusesOutOfRangeSlotAndWritesNothing) {
  KvFixture f;
  const std::vector<uint16_t> kv = KvFixture::random_kv(4, 7);
  std::vector<float> amax(2 * KvFixture::kHkv, 0.0f);
  const std::vector<uint8_t> before = f.pool;
  for (int32_t bad : {KvFixture::kSlots, -1}) {
    const std::vector<int32_t> slots = {0, 1, bad, 3};
    QuantizeKvParams p = f.params(kv, slots);
    p.observe_amax = amax.data();
    expect_error([&] { f.cpu->quantize_kv(p); }, "token 2: slot " + std::to_string(bad));
    EXPECT_EQ(f.pool, before);
    EXPECT_EQ(amax, std::vector<float>(2 * KvFixture::kHkv, 0.0f));
  }
  // Non-positive scale.
  f.k_scale[1] = 0.0f;
  const std::vector<int32_t> slots = {0, 1, 2, 3};
  expect_error([&] { f.cpu->quantize_kv(f.params(kv, slots)); }, "scales.k[1]");
  EXPECT_EQ(f.pool, before);
}

TEST(CpuBackend, QuantizeKvObservesAmaxAndPropagatesNan) {
  KvFixture f;
  constexpr int kHeads = 2 * KvFixture::kHkv, kD = KvFixture::kD;
  std::vector<uint16_t> kv = KvFixture::random_kv(5, 11);
  const std::vector<int32_t> slots = {4, 0, 7, 2, 5};
  std::vector<float> expected(kHeads, 0.0f);
  for (size_t t = 0; t < slots.size(); ++t) {
    for (int head = 0; head < kHeads; ++head) {
      for (int d = 0; d < kD; ++d) {
        const float x = bf16_to_float(kv[(t * kHeads + head) * kD + d]);
        expected[head] = std::max(expected[head], std::fabs(x));
      }
    }
  }
  std::vector<float> amax(kHeads, 0.0f);
  amax[3] = 1000.0f;  // running max keeps a larger old value
  expected[3] = 1000.0f;
  QuantizeKvParams p = f.params(kv, slots);
  p.observe_amax = amax.data();
  f.cpu->quantize_kv(p);
  EXPECT_EQ(amax, expected);

  // NaN in K head 1 of token 2, +inf in V head 0 of token 4 (written to V head 0 = index 2).
  kv[(2 * kHeads + 1) * kD + 5] = 0x7fc0;  // bf16 NaN
  kv[(4 * kHeads + 2) * kD + 9] = 0xff80;  // bf16 -inf
  f.cpu->quantize_kv(p);
  EXPECT_TRUE(std::isnan(amax[1]));
  EXPECT_TRUE(std::isinf(amax[2]) && amax[2] > 0);
  EXPECT_EQ(amax[0], expected[0]);
  EXPECT_EQ(amax[3], expected[3]);
  // A NaN already observed stays.
  kv = KvFixture::random_kv(5, 12);
  p.kv = kv.data();
  f.cpu->quantize_kv(p);
  EXPECT_TRUE(std::isnan(amax[1]));
}

// ---- quantize_q ----------------------------------------------------------------------------

TEST(CpuBackend, QuantizeQDynamicAndStaticScales) {
  test::ProblemSpec spec = small_spec();
  spec.requests = {{3, 4}, {9, 1}, {0, 6}};
  const test::AttentionProblem p = test::make_problem(spec);
  auto cpu = make_cpu_backend();
  const int B = p.num_requests(), Hq = p.num_q_heads, Hkv = p.num_kv_heads, D = p.head_dim;
  const int group = Hq / Hkv;
  const std::vector<float> static_scale = {0.01f, 0.03f};
  for (bool use_static : {false, true}) {
    SCOPED_TRACE(use_static ? "static" : "dynamic");
    std::vector<uint8_t> q_fp8(p.q.size());
    std::vector<float> q_scale(static_cast<size_t>(B) * Hkv);
    QuantizeQParams qq;
    qq.q = p.q.data();
    qq.q_fp8 = q_fp8.data();
    qq.q_scale = q_scale.data();
    qq.static_scale = use_static ? static_scale.data() : nullptr;
    qq.cu_seqlens_q = p.cu_seqlens_q.data();
    qq.num_requests = B;
    qq.total_q = p.total_q();
    qq.num_q_heads = Hq;
    qq.num_kv_heads = Hkv;
    qq.head_dim = D;
    cpu->quantize_q(qq);
    const std::vector<float> dynamic = test::dynamic_q_scales(p);
    for (int b = 0; b < B; ++b) {
      for (int g = 0; g < Hkv; ++g) {
        const float expected = use_static ? static_scale[g] : dynamic[b * Hkv + g];
        ASSERT_EQ(q_scale[b * Hkv + g], expected) << "request " << b << " group " << g;
        for (int64_t t = p.cu_seqlens_q[b]; t < p.cu_seqlens_q[b + 1]; ++t) {
          for (int h = g * group; h < (g + 1) * group; ++h) {
            for (int d = 0; d < D; ++d) {
              const int64_t e = (t * Hq + h) * D + d;
              ASSERT_EQ(q_fp8[e], quantize_e4m3(bf16_to_float(p.q[e]), expected));
            }
          }
        }
      }
    }
    if (!use_static) {
      // The dynamic scale puts each group's largest |q| exactly at 448.
      for (int b = 0; b < B; ++b) {
        for (int g = 0; g < Hkv; ++g) {
          int max_code = 0;
          for (int64_t t = p.cu_seqlens_q[b]; t < p.cu_seqlens_q[b + 1]; ++t) {
            for (int i = 0; i < group * D; ++i) {
              max_code = std::max(max_code, q_fp8[(t * Hq + g * group) * D + i] & 0x7f);
            }
          }
          EXPECT_EQ(max_code, 0x7e) << "request " << b << " group " << g;
        }
      }
    }
  }
}

// observe_amax: the running abs-max of Q per KV head over every request (calibrate --q-scales),
// in the same pass, with a static scale or a dynamic one, the quantized bytes unchanged; the
// dynamic scales are exactly the per-request maxima / 448, so the observed max / 448 is their
// max. A NaN in Q stays in the observed entry.
TEST(CpuBackend, QuantizeQObservesAbsMaxPerKvHead) {
  test::ProblemSpec spec = small_spec();
  spec.requests = {{3, 4}, {9, 1}, {0, 6}};
  test::AttentionProblem p = test::make_problem(spec);
  auto cpu = make_cpu_backend();
  const int B = p.num_requests(), Hq = p.num_q_heads, Hkv = p.num_kv_heads, D = p.head_dim;
  const int group = Hq / Hkv;
  const std::vector<float> static_scale = {0.01f, 0.03f};
  for (bool use_static : {false, true}) {
    SCOPED_TRACE(use_static ? "static" : "dynamic");
    std::vector<uint8_t> q_fp8(p.q.size()), q_fp8_plain(p.q.size());
    std::vector<float> q_scale(static_cast<size_t>(B) * Hkv), q_scale_plain(q_scale.size());
    // Running maxima to merge into: KV head 0's is below its Q (replaced), head 1's above (kept).
    std::vector<float> amax = {1e-6f, 1e3f};
    QuantizeQParams qq;
    qq.q = p.q.data();
    qq.q_fp8 = q_fp8_plain.data();
    qq.q_scale = q_scale_plain.data();
    qq.static_scale = use_static ? static_scale.data() : nullptr;
    qq.cu_seqlens_q = p.cu_seqlens_q.data();
    qq.num_requests = B;
    qq.total_q = p.total_q();
    qq.num_q_heads = Hq;
    qq.num_kv_heads = Hkv;
    qq.head_dim = D;
    cpu->quantize_q(qq);
    qq.q_fp8 = q_fp8.data();
    qq.q_scale = q_scale.data();
    qq.observe_amax = amax.data();
    cpu->quantize_q(qq);
    EXPECT_EQ(q_fp8, q_fp8_plain);
    EXPECT_EQ(q_scale, q_scale_plain);
    for (int g = 0; g < Hkv; ++g) {
      float q_max = 0.0f;
      for (int64_t t = 0; t < p.total_q(); ++t) {
        for (int i = 0; i < group * D; ++i) {
          q_max = std::max(q_max, std::fabs(bf16_to_float(p.q[(t * Hq + g * group) * D + i])));
        }
      }
      ASSERT_GT(q_max, 1e-6f);
      ASSERT_LT(q_max, 1e3f);
      EXPECT_EQ(amax[g], g == 0 ? q_max : 1e3f) << "group " << g;
      if (!use_static) {
        float scale_max = 0.0f;
        for (int b = 0; b < B; ++b) scale_max = std::max(scale_max, q_scale[b * Hkv + g]);
        EXPECT_EQ(scale_max, q_max / kE4m3Max) << "group " << g;
      }
    }
  }
  std::vector<float> amax(static_cast<size_t>(Hkv), 0.0f);
  std::vector<uint8_t> q_fp8(p.q.size());
  std::vector<float> q_scale(static_cast<size_t>(B) * Hkv);
  p.q[(2 * Hq + group) * D + 5] = float_to_bf16(NAN);  // token 2, KV head 1's group
  QuantizeQParams qq;
  qq.q = p.q.data();
  qq.q_fp8 = q_fp8.data();
  qq.q_scale = q_scale.data();
  qq.static_scale = static_scale.data();
  qq.observe_amax = amax.data();
  qq.cu_seqlens_q = p.cu_seqlens_q.data();
  qq.num_requests = B;
  qq.total_q = p.total_q();
  qq.num_q_heads = Hq;
  qq.num_kv_heads = Hkv;
  qq.head_dim = D;
  cpu->quantize_q(qq);
  EXPECT_TRUE(std::isfinite(amax[0]));
  EXPECT_TRUE(std::isnan(amax[1]));
}

TEST(CpuBackend, QuantizeQAllZeroGroupGetsScaleOne) {
  auto cpu = make_cpu_backend();
  const int Hq = 2, Hkv = 1, D = 64;
  std::vector<uint16_t> q(2 * Hq * D, 0);  // 2 tokens, one request
  std::vector<uint8_t> q_fp8(q.size(), 0xcd);
  std::vector<float> q_scale(1, -1.0f);
  const std::vector<int32_t> cu = {0, 2};
  QuantizeQParams qq;
  qq.q = q.data();
  qq.q_fp8 = q_fp8.data();
  qq.q_scale = q_scale.data();
  qq.cu_seqlens_q = cu.data();
  qq.num_requests = 1;
  qq.total_q = 2;
  qq.num_q_heads = Hq;
  qq.num_kv_heads = Hkv;
  qq.head_dim = D;
  cpu->quantize_q(qq);
  EXPECT_EQ(q_scale[0], 1.0f);
  EXPECT_EQ(q_fp8, std::vector<uint8_t>(q.size(), 0));
}

// ---- validation ----------------------------------------------------------------------------

// A valid prefill call on host memory that each check below breaks in one way.
struct AttentionFixture {
  test::AttentionProblem p;
  std::vector<uint8_t> pool;
  std::vector<uint8_t> q_fp8;
  std::vector<float> q_scale, k_scale, v_scale;
  std::vector<uint16_t> o;
  std::unique_ptr<Backend> cpu = make_cpu_backend();

  explicit AttentionFixture(std::vector<test::RequestShape> requests) {
    test::ProblemSpec spec = small_spec();
    spec.requests = std::move(requests);
    p = test::make_problem(spec);
    pool.assign(p.pool_elements(), 0);
    q_fp8.assign(p.q.size(), 0);
    q_scale.assign(p.num_requests() * p.num_kv_heads, 1.0f);
    k_scale.assign(p.num_kv_heads, 1.0f);
    v_scale.assign(p.num_kv_heads, 1.0f);
    o.assign(p.q.size(), 0x1234);
  }
  AttentionParams params() {
    AttentionParams a;
    a.q = p.q.data();
    a.q_fp8 = q_fp8.data();
    a.q_scale = q_scale.data();
    a.o = o.data();
    a.num_q_heads = p.num_q_heads;
    a.cache.data = pool.data();
    a.cache.num_slots = p.num_slots;
    a.cache.num_kv_heads = p.num_kv_heads;
    a.cache.head_dim = p.head_dim;
    a.cache.scheme = KvScheme::kFp8PerHead;
    a.scales.k = k_scale.data();
    a.scales.v = v_scale.data();
    a.batch = p.host_batch();
    return a;
  }
  bool output_untouched() const {
    return std::all_of(o.begin(), o.end(), [](uint16_t x) { return x == 0x1234; });
  }
};

TEST(CpuBackend, AttentionValidationErrors) {
  AttentionFixture f({{3, 4}, {0, 5}});
  Backend& cpu = *f.cpu;
  auto prefill = [&](AttentionParams a) { return [&cpu, a] { cpu.prefill_attention(a); }; };
  AttentionParams a = f.params();
  EXPECT_NO_THROW(cpu.prefill_attention(a));  // the baseline is valid
  f.o.assign(f.o.size(), 0x1234);

  a = f.params();
  a.batch.num_requests = 0;
  expect_error(prefill(a), "prefill_attention: empty batch");
  a = f.params();
  a.cache.head_dim = 96;
  expect_error(prefill(a), "head_dim 96 not built: supported 64, 128, 256");
  a = f.params();
  a.num_q_heads = 7;
  expect_error(prefill(a), "num_q_heads 7 is not a positive multiple of num_kv_heads 2");
  a = f.params();
  a.scales.v = nullptr;
  expect_error(prefill(a), "scales.v is null");
  a = f.params();
  a.q_fp8 = nullptr;
  expect_error(prefill(a), "q_fp8");
  // The CUDA kernels' 16-byte copies: a tensor that does not start on a 16-byte boundary (an
  // odd-offset view) is refused by name on every backend, before anything is written.
  a = f.params();
  a.o = reinterpret_cast<uint16_t*>(reinterpret_cast<char*>(a.o) + 2);
  expect_error(prefill(a), "o is not 16-byte aligned");
  a = f.params();
  a.cache.data = static_cast<uint8_t*>(a.cache.data) + 8;
  expect_error(prefill(a), "cache.data is not 16-byte aligned");
  a = f.params();
  a.batch.total_q += 1;
  expect_error(prefill(a), "total_q");
  a = f.params();
  a.batch.max_q_len = 3;  // request 0 has 4 new tokens
  expect_error(prefill(a), "request 0 has q_len 4 > batch.max_q_len 3");
  a = f.params();
  a.softmax_scale = std::numeric_limits<float>::quiet_NaN();
  expect_error(prefill(a), "softmax_scale");
  a = f.params();
  a.batch.max_requests = 0;
  expect_error(prefill(a), "batch.max_requests 0 must be positive");

  // Array contents: seq_len < q_len, a slot out of range.
  f.p.seq_len[1] = 4;
  expect_error(prefill(f.params()), "request 1: seq_len 4 not in [q_len 5");
  f.p.seq_len[1] = 5;
  int32_t& slot = f.p.req_to_token[f.p.req_index[0] * f.p.max_len + 2];
  const int32_t good_slot = slot;
  slot = -3;
  expect_error(prefill(f.params()), "request 0 position 2: slot -3 out of [0, num_slots");
  slot = good_slot;
  // b_req_idx outside req_to_token's rows (its row would be read past the table's end).
  const int rows = static_cast<int>(f.p.req_to_token.size() / f.p.max_len);
  const int32_t saved = f.p.req_index[1];
  f.p.req_index[1] = rows;
  expect_error(prefill(f.params()), "request 1: req_index " + std::to_string(rows) +
                                        " out of [0, max_requests " + std::to_string(rows) + ")");
  f.p.req_index[1] = -1;
  expect_error(prefill(f.params()), "request 1: req_index -1 out of [0, max_requests");
  f.p.req_index[1] = saved;
  EXPECT_TRUE(f.output_untouched());
}

TEST(CpuBackend, DecodeRefusesMoreThanOneNewToken) {
  AttentionFixture f({{3, 1}, {5, 2}});
  AttentionParams a = f.params();
  // The host-visible facts already say so.
  expect_error([&] { f.cpu->decode_attention(a); },
               "decode_attention: batch.max_q_len 2, total_q 3 for 2 requests");
  // Host facts lying (claiming one token each) is caught from cu_seqlens_q.
  AttentionFixture g({{3, 1}, {5, 1}});
  g.p.cu_seqlens_q = {0, 0, 2};
  a = g.params();
  a.batch.max_q_len = 1;
  expect_error([&] { g.cpu->decode_attention(a); }, "request 0 has q_len 0");
  EXPECT_TRUE(f.output_untouched());
  EXPECT_TRUE(g.output_untouched());
}

// AttentionBatch::decode_order changes which CTA takes a request, never a bit: a decode in
// any permutation gives the bits of one without it. Not a permutation (an entry out of range or
// repeated), or given to prefill, it is refused by name before anything is written.
TEST(CpuBackend, DecodeOrderIsAPermutationAndChangesNoBit) {
  test::ProblemSpec spec = small_spec();
  spec.requests = {{5, 1}, {0, 1}, {130, 1}, {64, 1}};
  const test::AttentionProblem p = test::make_problem(spec);
  auto cpu = make_cpu_backend();
  const KvScheme scheme = KvScheme::kFp8PerHead;
  const test::KvScales scales = test::calibrate_scales(p, scheme);
  test::RunOptions opt;
  opt.phase = AttentionPhase::kDecode;
  const std::vector<uint16_t> plain = test::run_attention(*cpu, p, scheme, scales, opt).o;
  opt.decode_order = {2, 3, 0, 1};
  EXPECT_TRUE(test::run_attention(*cpu, p, scheme, scales, opt).o == plain);

  AttentionFixture f({{5, 1}, {0, 1}, {130, 1}});
  const std::vector<int32_t> repeated = {2, 0, 2}, outside = {2, 3, 0};
  AttentionParams a = f.params();
  a.batch.decode_order = repeated.data();
  expect_error([&] { f.cpu->decode_attention(a); },
               "decode_attention: batch.decode_order[2] = 2 repeats an earlier entry");
  a.batch.decode_order = outside.data();
  expect_error([&] { f.cpu->decode_attention(a); },
               "decode_attention: batch.decode_order[1] = 3 out of [0, num_requests 3)");
  AttentionFixture g({{3, 4}, {0, 5}});
  a = g.params();
  const std::vector<int32_t> two = {1, 0};
  a.batch.decode_order = two.data();
  expect_error([&] { g.cpu->prefill_attention(a); },
               "prefill_attention: batch.decode_order is set");
  EXPECT_TRUE(f.output_untouched());
  EXPECT_TRUE(g.output_untouched());
}

TEST(CpuBackend, QuantizeQValidationErrors) {
  auto cpu = make_cpu_backend();
  std::vector<uint16_t> q(3 * 4 * 64, 0);
  std::vector<uint8_t> q_fp8(q.size());
  std::vector<float> q_scale(2);
  std::vector<int32_t> cu = {0, 1, 3};
  QuantizeQParams qq;
  qq.q = q.data();
  qq.q_fp8 = q_fp8.data();
  qq.q_scale = q_scale.data();
  qq.cu_seqlens_q = cu.data();
  qq.num_requests = 2;
  qq.total_q = 3;
  qq.num_q_heads = 4;
  qq.num_kv_heads = 1;
  qq.head_dim = 64;
  EXPECT_NO_THROW(cpu->quantize_q(qq));
  QuantizeQParams bad = qq;
  bad.num_requests = 0;
  expect_error([&] { cpu->quantize_q(bad); }, "quantize_q: empty batch");
  bad = qq;
  bad.head_dim = 96;
  expect_error([&] { cpu->quantize_q(bad); }, "head_dim 96 not built");
  bad = qq;
  bad.num_kv_heads = 3;
  expect_error([&] { cpu->quantize_q(bad); }, "num_q_heads 4 is not a positive multiple");
  cu = {0, 2, 1};
  expect_error([&] { cpu->quantize_q(qq); }, "cu_seqlens_q decreases at request 1");
}

// ---- attention against float64 ------------------------------------------------------------

struct SweepCase {
  const char* name;
  std::vector<test::RequestShape> requests;
  int num_q_heads, num_kv_heads, head_dim;
  AttentionPhase phase;
};

// Lengths 1, 7, 127, 300; GQA 1, 4, 8; D 64, 128, 256; cached prefix and fresh requests mixed,
// one-token requests; prefill and decode.
std::vector<SweepCase> sweep_cases() {
  const AttentionPhase kP = AttentionPhase::kPrefill, kDec = AttentionPhase::kDecode;
  return {
      {"gqa1_d64_mixed", {{0, 1}, {0, 7}, {120, 7}, {0, 127}}, 4, 4, 64, kP},
      {"gqa4_d128_long", {{173, 127}, {0, 7}, {6, 1}}, 8, 2, 128, kP},
      {"gqa8_d256", {{290, 10}, {0, 1}, {0, 7}}, 8, 1, 256, kP},
      {"gqa4_d64_300_fresh", {{0, 300}}, 4, 1, 64, kP},
      {"decode_gqa4_d128", {{0, 1}, {6, 1}, {126, 1}, {299, 1}}, 8, 2, 128, kDec},
      {"decode_gqa8_d256", {{0, 1}, {299, 1}}, 8, 1, 256, kDec},
      {"decode_gqa1_d64", {{126, 1}, {6, 1}}, 2, 2, 64, kDec},
  };
}

struct Measured {
  test::ErrorStats vs_exact, vs_emulated;
};

Measured measure(const test::AttentionProblem& p, KvScheme scheme, AttentionPhase phase) {
  auto cpu = make_cpu_backend();
  const test::KvScales scales = test::calibrate_scales(p, scheme);
  test::RunOptions options;
  options.phase = phase;
  const test::AttentionRun run = test::run_attention(*cpu, p, scheme, scales, options);
  const auto ref = test::reference_attention(p, test::exact_inputs(p));
  const auto emu = test::reference_attention(p, test::emulated_inputs(p, scheme, scales));
  return {test::compare(run.o, ref, p.head_dim), test::compare(run.o, emu, p.head_dim)};
}

void expect_within(const test::ErrorStats& e, Bounds b, const char* what) {
  EXPECT_EQ(e.nonfinite, 0) << what;
  EXPECT_LE(e.normalized, b.normalized) << what << ": " << e.str();
  EXPECT_LE(e.max_row, b.max_row) << what << ": " << e.str();
}

TEST(CpuBackend, AttentionMatchesFloat64Reference) {
  for (const SweepCase& c : sweep_cases()) {
    test::ProblemSpec spec;
    spec.requests = c.requests;
    spec.num_q_heads = c.num_q_heads;
    spec.num_kv_heads = c.num_kv_heads;
    spec.head_dim = c.head_dim;
    spec.data.head_range = 30.0f;
    spec.data.outlier_channels = 4;
    spec.seed = 1000 + c.head_dim + c.num_q_heads;
    const test::AttentionProblem p = test::make_problem(spec);
    for (KvScheme scheme : kSchemes) {
      const std::string trace = std::string(c.name) + " " + scheme_name(scheme);
      SCOPED_TRACE(trace);
      const Measured m = measure(p, scheme, c.phase);
      expect_within(m.vs_exact, exact_bound(scheme), "vs exact");
      expect_within(m.vs_emulated, emulated_bound(scheme, c.phase, c.head_dim), "vs emulated");
      std::printf("  %-22s %-18s vs exact: %s | vs emulated: %s\n", c.name, scheme_name(scheme),
                  m.vs_exact.str().c_str(), m.vs_emulated.str().c_str());
    }
  }
}

// fp8-per-head rounds P to e4m3 as 2^8 p (kPScale, scheme.h). A long row with an attention sink
// and a diffuse tail is where that matters (test::make_sink_problem): one key 8 nats above 8191
// others gives those p ~ e^-8 ~ 3.4e-4, below 2^-10, which e4m3 would round to 0 unscaled: the
// tail (2.8 times the sink's mass, with V offset by +1) would vanish from P V while the row sum
// still counts it (measured: error 2.59). Scaled, they keep their 3 mantissa bits: the twin stays
// within its usual bound of float64 attention on its own (FP8-rounded) inputs (6.2e-3), in decode
// and in prefill.
TEST(CpuBackend, Fp8PerHeadKeepsTheDiffuseTailOfALongRow) {
  constexpr int L = 8192;
  for (AttentionPhase phase : {AttentionPhase::kDecode, AttentionPhase::kPrefill}) {
    const int q_len = phase == AttentionPhase::kDecode ? 1 : 4;
    const test::AttentionProblem p = test::make_sink_problem(L, q_len, 64, 77);
    SCOPED_TRACE(phase == AttentionPhase::kDecode ? "decode" : "prefill");
    const Measured m = measure(p, KvScheme::kFp8PerHead, phase);
    expect_within(m.vs_emulated, emulated_bound(KvScheme::kFp8PerHead, phase, 64), "vs emulated");
    std::printf("  sink + diffuse tail, %d keys: vs emulated %s\n", L, m.vs_emulated.str().c_str());
  }
}

TEST(CpuBackend, PrefillOfOneTokenEqualsDecode) {
  test::ProblemSpec spec;
  spec.requests = {{0, 1}, {40, 1}, {7, 1}};
  spec.data.outlier_channels = 2;
  const test::AttentionProblem p = test::make_problem(spec);
  auto cpu = make_cpu_backend();
  for (KvScheme scheme : kSchemes) {
    const test::KvScales scales = test::calibrate_scales(p, scheme);
    test::RunOptions decode;
    decode.phase = AttentionPhase::kDecode;
    const std::vector<uint16_t> pre = test::run_attention(*cpu, p, scheme, scales).o;
    const std::vector<uint16_t> dec = test::run_attention(*cpu, p, scheme, scales, decode).o;
    if (fp8_p(scheme, true, p.head_dim) == fp8_p(scheme, false, p.head_dim)) {
      EXPECT_EQ(pre, dec) << scheme_name(scheme);
    } else {
      // fp8-per-tensor's prefill at head_dim 128 rounds P to e4m3 (fp8_p, scheme.h), its decode
      // does not: the same output up to that rounding.
      EXPECT_NE(pre, dec) << scheme_name(scheme);
      std::vector<double> dec_f(dec.size());
      for (size_t i = 0; i < dec.size(); ++i) dec_f[i] = bf16_to_float(dec[i]);
      expect_within(test::compare(pre, dec_f, p.head_dim),
                    emulated_bound(scheme, AttentionPhase::kPrefill, p.head_dim),
                    "prefill (e4m3 P) vs decode");
    }
  }
}

TEST(CpuBackend, ExplicitSoftmaxScale) {
  test::ProblemSpec spec;
  spec.requests = {{20, 5}, {0, 3}};
  spec.head_dim = 64;
  const test::AttentionProblem p = test::make_problem(spec);
  auto cpu = make_cpu_backend();
  const test::KvScales none;
  test::RunOptions options;
  options.softmax_scale = 1.0f / 8.0f;  // == 1/sqrt(64): same as the default
  EXPECT_EQ(test::run_attention(*cpu, p, KvScheme::kBf16, none, options).o,
            test::run_attention(*cpu, p, KvScheme::kBf16, none).o);
  options.softmax_scale = 0.3f;
  const auto o = test::run_attention(*cpu, p, KvScheme::kBf16, none, options).o;
  const auto ref = test::reference_attention(p, test::exact_inputs(p), 0.3);
  expect_within(test::compare(o, ref, p.head_dim), exact_bound(KvScheme::kBf16), "scale 0.3");
}

// ---- non-causal prefill (AttentionParams::causal = false) ----------------------------------

// softmax(Q_b K_b^T * scale) V_b per request b and query head, every key of the request, in
// float64 and written as the matrices (no positions, no mask): the definition of non-causal
// attention, independent of reference_attention's loops. [total_q, Hq, D].
std::vector<double> dense_attention(const test::AttentionProblem& p,
                                    const test::ReferenceInputs& in) {
  const int Hq = p.num_q_heads, Hkv = p.num_kv_heads, D = p.head_dim, group = Hq / Hkv;
  const double sm = 1.0 / std::sqrt(static_cast<double>(D));
  std::vector<double> out(static_cast<size_t>(p.total_q()) * Hq * D, 0.0);
  for (int b = 0; b < p.num_requests(); ++b) {
    const int M = p.q_len(b), N = p.seq_len[b];
    for (int h = 0; h < Hq; ++h) {
      const int g = h / group;
      // S [M, N] = Q_b [M, D] x K_b^T [D, N] * sm
      std::vector<double> S(static_cast<size_t>(M) * N, 0.0);
      for (int m = 0; m < M; ++m) {
        for (int n = 0; n < N; ++n) {
          for (int d = 0; d < D; ++d) {
            S[m * N + n] += in.q[((p.cu_seqlens_q[b] + m) * Hq + h) * D + d] *
                            in.kv[((p.kv_begin[b] + n) * 2 * Hkv + g) * D + d];
          }
          S[m * N + n] *= sm;
        }
      }
      // P = row softmax of S; O_b [M, D] = P [M, N] x V_b [N, D]
      for (int m = 0; m < M; ++m) {
        const double mx = *std::max_element(S.begin() + m * N, S.begin() + (m + 1) * N);
        double sum = 0.0;
        for (int n = 0; n < N; ++n) sum += std::exp(S[m * N + n] - mx);
        double* o = &out[((p.cu_seqlens_q[b] + m) * Hq + h) * D];
        for (int n = 0; n < N; ++n) {
          const double w = std::exp(S[m * N + n] - mx) / sum;
          for (int d = 0; d < D; ++d)
            o[d] += w * in.kv[((p.kv_begin[b] + n) * 2 * Hkv + Hkv + g) * D + d];
        }
      }
    }
  }
  return out;
}

// Cached prefixes (q_len < seq_len), a fresh request, a one-token and an empty request, GQA 4.
test::ProblemSpec noncausal_spec() {
  test::ProblemSpec spec;
  spec.requests = {{6, 5}, {0, 7}, {9, 1}, {4, 0}, {0, 3}};
  spec.num_q_heads = 8;
  spec.num_kv_heads = 2;
  spec.head_dim = 64;
  spec.data.head_range = 30.0f;
  spec.data.outlier_channels = 3;
  spec.seed = 1717;
  return spec;
}

TEST(CpuBackend, NonCausalPrefillMatchesDenseSoftmax) {
  const test::AttentionProblem p = test::make_problem(noncausal_spec());
  auto cpu = make_cpu_backend();
  // The reference the GPU tests use agrees with the dense definition (float64 both: only the
  // summation order differs).
  const std::vector<double> dense_exact = dense_attention(p, test::exact_inputs(p));
  const test::ErrorStats ref_vs_dense =
      test::compare(test::reference_attention(p, test::exact_inputs(p), 0.0, /*causal=*/false),
                    dense_exact, p.head_dim);
  EXPECT_LE(ref_vs_dense.normalized, 1e-12) << ref_vs_dense.str();
  for (KvScheme scheme : kSchemes) {
    SCOPED_TRACE(scheme_name(scheme));
    const test::KvScales scales = test::calibrate_scales(p, scheme);
    test::RunOptions options;
    options.causal = false;
    const test::AttentionRun run = test::run_attention(*cpu, p, scheme, scales, options);
    const auto emu = dense_attention(p, test::emulated_inputs(p, scheme, scales));
    const test::ErrorStats vs_exact = test::compare(run.o, dense_exact, p.head_dim);
    const test::ErrorStats vs_emulated = test::compare(run.o, emu, p.head_dim);
    expect_within(vs_exact, exact_bound(scheme), "non-causal vs dense exact");
    expect_within(vs_emulated, emulated_bound(scheme, AttentionPhase::kPrefill, p.head_dim),
                  "non-causal vs dense emulated");
    std::printf("  non-causal %-18s vs dense exact: %s | vs dense emulated: %s\n",
                scheme_name(scheme), vs_exact.str().c_str(), vs_emulated.str().c_str());
    // And the causal output is another one (its first new tokens miss keys): far further from
    // the dense result than the non-causal run's own rounding error.
    const test::ErrorStats causal_vs_dense =
        test::compare(test::run_attention(*cpu, p, scheme, scales).o, dense_exact, p.head_dim);
    EXPECT_GT(causal_vs_dense.normalized, 5 * vs_exact.normalized) << causal_vs_dense.str();
  }
}

// causal = true is the default and the causal output stays what it was; decode ignores the flag.
TEST(CpuBackend, CausalIsTheDefaultAndDecodeIgnoresTheFlag) {
  const test::AttentionProblem p = test::make_problem(noncausal_spec());
  test::ProblemSpec one = noncausal_spec();
  one.requests = {{6, 1}, {0, 1}, {30, 1}};
  const test::AttentionProblem d = test::make_problem(one);
  auto cpu = make_cpu_backend();
  for (KvScheme scheme : kSchemes) {
    SCOPED_TRACE(scheme_name(scheme));
    const test::KvScales scales = test::calibrate_scales(p, scheme);
    test::RunOptions causal;
    causal.causal = true;
    const auto o_default = test::run_attention(*cpu, p, scheme, scales).o;
    EXPECT_EQ(test::run_attention(*cpu, p, scheme, scales, causal).o, o_default);
    const auto ref = test::reference_attention(p, test::emulated_inputs(p, scheme, scales));
    expect_within(test::compare(o_default, ref, p.head_dim),
                  emulated_bound(scheme, AttentionPhase::kPrefill, p.head_dim), "causal");

    const test::KvScales d_scales = test::calibrate_scales(d, scheme);
    test::RunOptions decode;
    decode.phase = AttentionPhase::kDecode;
    const auto o_decode = test::run_attention(*cpu, d, scheme, d_scales, decode).o;
    decode.causal = false;
    EXPECT_EQ(test::run_attention(*cpu, d, scheme, d_scales, decode).o, o_decode);
  }
}

// A request with a cached prefix: non-causal, every new token sees the keys after its own
// position. Flipping the sign of the last key's V row moves every new token's output
// non-causally; causally only the last token's (the only one at that position). The last token
// sees every key under both rules: its output has the same bits either way.
TEST(CpuBackend, NonCausalSeesKeysAfterItsOwnPosition) {
  test::ProblemSpec spec;
  spec.requests = {{5, 4}, {0, 3}};
  spec.num_q_heads = 4;
  spec.num_kv_heads = 1;
  spec.head_dim = 64;
  spec.data.logit_std = 0.5f;  // flat attention: every key carries a weight well above e4m3's
                               // smallest P (2^-9), so the flipped row shows in every output
  spec.seed = 99;
  const test::AttentionProblem p = test::make_problem(spec);
  test::AttentionProblem flipped = p;
  const int Hkv = p.num_kv_heads, D = p.head_dim;
  for (int b = 0; b < p.num_requests(); ++b) {
    const int64_t last = p.kv_begin[b] + p.seq_len[b] - 1;  // the request's last token
    for (int d = 0; d < D; ++d) flipped.kv[(last * 2 * Hkv + Hkv) * D + d] ^= 0x8000;  // V sign
  }
  const int64_t row = static_cast<int64_t>(p.num_q_heads) * D;  // one token's output
  auto token = [&](const std::vector<uint16_t>& o, int64_t t) {
    return std::vector<uint16_t>(o.begin() + t * row, o.begin() + (t + 1) * row);
  };
  auto cpu = make_cpu_backend();
  for (KvScheme scheme : kSchemes) {
    SCOPED_TRACE(scheme_name(scheme));
    const test::KvScales scales = test::calibrate_scales(p, scheme);  // the same for both runs
    test::RunOptions non_causal;
    non_causal.causal = false;
    const auto c0 = test::run_attention(*cpu, p, scheme, scales).o;
    const auto c1 = test::run_attention(*cpu, flipped, scheme, scales).o;
    const auto n0 = test::run_attention(*cpu, p, scheme, scales, non_causal).o;
    const auto n1 = test::run_attention(*cpu, flipped, scheme, scales, non_causal).o;
    for (int b = 0; b < p.num_requests(); ++b) {
      for (int64_t t = p.cu_seqlens_q[b]; t < p.cu_seqlens_q[b + 1]; ++t) {
        const bool last = t == p.cu_seqlens_q[b + 1] - 1;
        SCOPED_TRACE("request " + std::to_string(b) + " token " + std::to_string(t));
        EXPECT_NE(token(n0, t), token(n1, t)) << "non-causal misses the request's last key";
        if (last) {
          EXPECT_NE(token(c0, t), token(c1, t));
          EXPECT_EQ(token(n0, t), token(c0, t)) << "the last token sees every key either way";
        } else {
          EXPECT_EQ(token(c0, t), token(c1, t)) << "causal sees a key past its position";
          EXPECT_NE(token(n0, t), token(c0, t));
        }
      }
    }
  }
}

TEST(CpuBackend, StaticQScalesFeedAttention) {
  test::ProblemSpec spec;
  spec.requests = {{30, 6}, {0, 4}};
  spec.data.outlier_channels = 3;
  const test::AttentionProblem p = test::make_problem(spec);
  auto cpu = make_cpu_backend();
  const KvScheme scheme = KvScheme::kFp8PerHead;
  const test::KvScales scales = test::calibrate_scales(p, scheme);
  // Static scales from "calibration": the max of the dynamic ones over requests.
  const std::vector<float> dynamic = test::dynamic_q_scales(p);
  std::vector<float> static_q(p.num_kv_heads, 0.0f);
  for (int b = 0; b < p.num_requests(); ++b) {
    for (int g = 0; g < p.num_kv_heads; ++g) {
      static_q[g] = std::max(static_q[g], dynamic[b * p.num_kv_heads + g]);
    }
  }
  test::RunOptions options;
  options.static_q_scale = static_q;
  const test::AttentionRun run = test::run_attention(*cpu, p, scheme, scales, options);
  for (int b = 0; b < p.num_requests(); ++b) {
    for (int g = 0; g < p.num_kv_heads; ++g)
      EXPECT_EQ(run.q_scale[b * p.num_kv_heads + g], static_q[g]);
  }
  const auto emu = test::reference_attention(p, test::emulated_inputs(p, scheme, scales, static_q));
  expect_within(test::compare(run.o, emu, p.head_dim),
                emulated_bound(scheme, AttentionPhase::kPrefill, p.head_dim), "vs emulated");
}

// K/V heads whose ranges differ by 10^4 (KV head g scaled by 10^(4g/3)): one per-tensor scale,
// set by the largest head, pushes the smallest head's values down into the e4m3 subnormals (or
// to zero); per-head scales give every head the full e4m3 range. Measured per KV head (its
// group of query heads), since the whole-output error is dominated by the largest heads.
TEST(CpuBackend, PerHeadScalesBeatPerTensorWhenHeadRangesDiffer) {
  test::ProblemSpec spec;
  spec.requests = {{60, 20}, {0, 33}, {100, 1}};
  spec.num_q_heads = 8;
  spec.num_kv_heads = 4;
  spec.head_dim = 128;
  spec.data.head_range = 1e4f;
  spec.data.outlier_channels = 4;
  spec.seed = 77;
  const test::AttentionProblem p = test::make_problem(spec);
  const int group = p.num_q_heads / p.num_kv_heads;
  const auto ref = test::reference_attention(p, test::exact_inputs(p));
  auto cpu = make_cpu_backend();
  std::vector<test::ErrorStats> by_kv_head[2];  // [per-tensor, per-head][KV head]
  for (KvScheme scheme : {KvScheme::kFp8PerTensor, KvScheme::kFp8PerHead}) {
    const test::AttentionRun run =
        test::run_attention(*cpu, p, scheme, test::calibrate_scales(p, scheme));
    // [total_q, Hq, D] is [total_q, Hkv, group * D]: one "head" per KV head's query group.
    auto& errors = by_kv_head[scheme == KvScheme::kFp8PerHead];
    errors = test::compare_by_head(run.o, ref, p.num_kv_heads, group * p.head_dim);
    std::printf("  KV head ranges 1..1e4, %-15s normalized error per KV head:",
                scheme_name(scheme));
    for (const test::ErrorStats& e : errors) std::printf(" %.3f", e.normalized);
    std::printf("\n");
  }
  const double small_tensor = by_kv_head[0][0].normalized, small_head = by_kv_head[1][0].normalized;
  EXPECT_GT(small_tensor, 2.5 * small_head)
      << "smallest KV head: per-tensor " << small_tensor << ", per-head " << small_head;
  EXPECT_LT(test::worst_head_error(by_kv_head[1]), test::worst_head_error(by_kv_head[0]));
  for (const test::ErrorStats& e : by_kv_head[1]) {
    expect_within(e, exact_bound(KvScheme::kFp8PerHead), "per-head, one KV head");
  }
}

// fp8-per-head-bf16q stores fp8-per-head's very bytes; keeping Q and P out of e4m3 only removes
// rounding, so on the same data its error against the exact reference is below fp8-per-head's
// (and not above fp8-per-tensor's when K/V heads share one range, where the two store the same
// grid up to the scale).
TEST(CpuBackend, PerHeadBf16QStoresPerHeadBytesAndRoundsLess) {
  test::ProblemSpec spec;
  spec.requests = {{90, 30}, {0, 41}, {200, 1}};
  spec.num_q_heads = 8;
  spec.num_kv_heads = 2;
  spec.head_dim = 128;
  spec.data.head_range = 30.0f;
  spec.data.outlier_channels = 4;
  spec.seed = 4242;
  const test::AttentionProblem p = test::make_problem(spec);
  auto cpu = make_cpu_backend();
  const test::KvScales scales = test::calibrate_scales(p, KvScheme::kFp8PerHead);
  EXPECT_EQ(scales.k, test::calibrate_scales(p, KvScheme::kFp8PerHeadBf16Q).k);
  const test::AttentionRun head = test::run_attention(*cpu, p, KvScheme::kFp8PerHead, scales);
  const test::AttentionRun bf16q = test::run_attention(*cpu, p, KvScheme::kFp8PerHeadBf16Q, scales);
  EXPECT_EQ(head.pool, bf16q.pool);
  EXPECT_TRUE(bf16q.q_scale.empty());  // Q stays bf16: no quantize_q
  const auto ref = test::reference_attention(p, test::exact_inputs(p));
  const test::ErrorStats e_head = test::compare(head.o, ref, p.head_dim);
  const test::ErrorStats e_bf16q = test::compare(bf16q.o, ref, p.head_dim);
  std::printf("  vs exact: fp8-per-head %s\n            fp8-per-head-bf16q %s\n",
              e_head.str().c_str(), e_bf16q.str().c_str());
  EXPECT_LT(e_bf16q.normalized, e_head.normalized);
  expect_within(e_bf16q, exact_bound(KvScheme::kFp8PerHeadBf16Q), "bf16q vs exact");
}

// A per_tensor calibration file serves fp8-per-head-bf16q broadcast (every KV head gets the
// layer's scale, calib.h's scales_for_scheme): then it writes fp8-per-tensor's bytes and computes
// fp8-per-tensor's attention, bit for bit, in prefill and in decode. (Prefill at head_dim 64:
// at 128 fp8-per-tensor's prefill rounds P to e4m3, fp8_p, and fp8-per-head-bf16q's does not.)
TEST(CpuBackend, PerHeadBf16QOnBroadcastScalesIsFp8PerTensor) {
  auto cpu = make_cpu_backend();
  for (AttentionPhase phase : {AttentionPhase::kPrefill, AttentionPhase::kDecode}) {
    const bool prefill = phase == AttentionPhase::kPrefill;
    test::ProblemSpec spec;
    spec.requests = prefill ? std::vector<test::RequestShape>{{90, 30}, {0, 41}, {200, 1}}
                            : std::vector<test::RequestShape>{{90, 1}, {0, 1}, {200, 1}};
    spec.num_q_heads = 8;
    spec.num_kv_heads = 2;
    spec.head_dim = prefill ? 64 : 128;
    ASSERT_EQ(fp8_p(KvScheme::kFp8PerTensor, prefill, spec.head_dim),
              fp8_p(KvScheme::kFp8PerHeadBf16Q, prefill, spec.head_dim));
    spec.data.head_range = 30.0f;  // heads of different ranges: one scale fits none of them well
    spec.data.outlier_channels = 4;
    spec.seed = 4343;
    const test::AttentionProblem p = test::make_problem(spec);
    const test::KvScales tensor = test::calibrate_scales(p, KvScheme::kFp8PerTensor);
    test::KvScales broadcast;
    broadcast.k.assign(p.num_kv_heads, tensor.k[0]);
    broadcast.v.assign(p.num_kv_heads, tensor.v[0]);
    test::RunOptions o;
    o.phase = phase;
    const test::AttentionRun a = test::run_attention(*cpu, p, KvScheme::kFp8PerTensor, tensor, o);
    const test::AttentionRun b =
        test::run_attention(*cpu, p, KvScheme::kFp8PerHeadBf16Q, broadcast, o);
    EXPECT_EQ(a.pool, b.pool);
    EXPECT_EQ(a.o, b.o) << (prefill ? "prefill" : "decode");
    for (uint16_t x : a.o) ASSERT_TRUE(std::isfinite(bf16_to_float(x)));
  }
}

// The table the docs quote: measured errors per scheme on one representative batch.
TEST(CpuBackend, ErrorBoundsReport) {
  test::ProblemSpec spec;
  spec.requests = {{200, 56}, {0, 100}, {299, 1}, {50, 7}};
  spec.num_q_heads = 8;
  spec.num_kv_heads = 2;
  spec.head_dim = 128;
  spec.data.head_range = 30.0f;
  spec.data.outlier_channels = 4;
  spec.seed = 2024;
  const test::AttentionProblem p = test::make_problem(spec);
  std::printf(
      "  batch: 4 requests (seq 256/100/300/57, new 56/100/1/7), Hq 8, Hkv 2, D 128,\n"
      "         K/V head ranges 1..30, 4 outlier K channels x20-50, logit std 2\n");
  std::printf("  %-18s %-12s %-10s %-12s %-10s %-12s %-10s\n", "scheme", "normalized", "bound",
              "max_row", "bound", "vs_emulated", "bound");
  for (KvScheme scheme : kSchemes) {
    const Measured m = measure(p, scheme, AttentionPhase::kPrefill);
    const Bounds be = exact_bound(scheme),
                 bm = emulated_bound(scheme, AttentionPhase::kPrefill, 128);
    std::printf("  %-18s %-12.3e %-10.3e %-12.3e %-10.3e %-12.3e %-10.3e\n", scheme_name(scheme),
                m.vs_exact.normalized, be.normalized, m.vs_exact.max_row, be.max_row,
                m.vs_emulated.normalized, bm.normalized);
    RecordProperty(std::string(scheme_name(scheme)) + "_normalized_error",
                   std::to_string(m.vs_exact.normalized));
    expect_within(m.vs_exact, be, scheme_name(scheme));
    expect_within(m.vs_emulated, bm, scheme_name(scheme));
  }
}

// The test problems and the float64 reference's inputs are drawn and converted in parallel
// (tests/kernel_test_util.h: each token's values from a generator of its own); the data must not
// depend on the number of threads, or a test's seed would not name its data. One thread against
// three, for a problem of odd sizes with a cached prefix, and every scheme's emulated inputs.
TEST(TestProblems, SameDataOnAnyNumberOfThreads) {
  test::ProblemSpec spec;
  spec.requests = {{130, 3}, {0, 1}, {7, 61}, {1029, 1}, {64, 64}};
  spec.num_q_heads = 12;
  spec.num_kv_heads = 3;
  spec.head_dim = 64;
  spec.data.head_range = 10.0f;
  spec.data.outlier_channels = 2;
  spec.seed = 4242;
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  const test::AttentionProblem one = test::make_problem(spec);
  std::vector<test::ReferenceInputs> one_inputs;
  for (KvScheme scheme : kSchemes) {
    one_inputs.push_back(test::emulated_inputs(one, scheme, test::calibrate_scales(one, scheme)));
  }
  omp_set_num_threads(3);
  const test::AttentionProblem three = test::make_problem(spec);
  EXPECT_TRUE(three.kv == one.kv) << "K/V values differ between 1 and 3 threads";
  EXPECT_TRUE(three.q == one.q) << "Q values differ between 1 and 3 threads";
  EXPECT_TRUE(three.kv_slot == one.kv_slot);
  for (size_t i = 0; i < std::size(kSchemes); ++i) {
    const test::ReferenceInputs in =
        test::emulated_inputs(three, kSchemes[i], test::calibrate_scales(three, kSchemes[i]));
    EXPECT_TRUE(in.kv == one_inputs[i].kv) << scheme_name(kSchemes[i]);
    EXPECT_TRUE(in.q == one_inputs[i].q) << scheme_name(kSchemes[i]);
  }
  omp_set_num_threads(threads);
  // Distinct tokens get distinct draws (the per-token generators are not one stream repeated).
  const size_t row = static_cast<size_t>(2 * spec.num_kv_heads * spec.head_dim);
  EXPECT_FALSE(std::equal(one.kv.begin(), one.kv.begin() + row, one.kv.begin() + row));
}

}  // namespace
}  // namespace fp8kv
