// Quantize-on-write and Q quantization on the GPU against their CPU twins: byte for byte, on
// fresh random data with outliers and special values (NaN, infinities, values past 448 * scale
// or past e5m2's 57344, subnormals), every scheme. Skips without a Hopper GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

#include "fp8kv/backend.h"
#include "fp8kv/error.h"
#include "fp8kv/fp8.h"
#include "gpu_skip.h"
#include "kernel_test_util.h"

namespace fp8kv {
namespace {

uint32_t bits_of(float x) { return detail::float_bits(x); }

struct KvCase {
  KvScheme scheme;
  int head_dim;
  int num_kv_heads;
  int num_tokens;
};

// One quantize_kv through a backend: pool pre-filled with 0xff, observation starting from `amax0`
// (none when it is empty: the plain write, which skips the observation).
struct KvResult {
  std::vector<uint8_t> pool;
  std::vector<float> amax;
};

KvResult run_quantize_kv(Backend& be, const KvCase& c, const std::vector<uint16_t>& kv,
                         const std::vector<int32_t>& slots, int64_t num_slots,
                         const test::KvScales& scales, const std::vector<float>& amax0) {
  const size_t pool_bytes = static_cast<size_t>(num_slots + 1) * 2 * c.num_kv_heads * c.head_dim *
                            kv_elem_bytes(c.scheme);
  BackendBuffer pool(be, pool_bytes);
  be.memset(pool.as<void>(), 0xff, pool_bytes);
  BackendBuffer d_kv(be, kv), d_slots(be, slots),
      amax(be, amax0.empty() ? std::vector<float>{0.0f} : amax0);
  const std::vector<float> ks = scales.k.empty() ? std::vector<float>{1.0f} : scales.k;
  const std::vector<float> vs = scales.v.empty() ? std::vector<float>{1.0f} : scales.v;
  BackendBuffer d_k(be, ks), d_v(be, vs);
  QuantizeKvParams p;
  p.kv = d_kv.as<uint16_t>();
  p.slots = d_slots.as<int32_t>();
  p.num_tokens = c.num_tokens;
  p.cache.data = pool.as<void>();
  p.cache.num_slots = num_slots;
  p.cache.num_kv_heads = c.num_kv_heads;
  p.cache.head_dim = c.head_dim;
  p.cache.scheme = c.scheme;
  if (has_kv_scales(c.scheme)) {
    p.scales.k = d_k.as<float>();
    p.scales.v = d_v.as<float>();
  }
  if (!amax0.empty()) p.observe_amax = amax.as<float>();
  be.quantize_kv(p);
  be.synchronize();
  return {pool.download<uint8_t>(), amax0.empty() ? std::vector<float>{} : amax.download<float>()};
}

TEST(CudaQuantizeKv, ByteIdenticalToCpu) {
  SKIP_WITHOUT_GPU();
  auto cpu = make_cpu_backend();
  auto gpu = make_cuda_backend();
  uint64_t seed = 100;
  for (KvScheme scheme : kAllSchemes) {
    for (int D : {64, 128, 256}) {
      for (int hkv : {1, 3, 8}) {
        for (int tokens : {1, 7, 127, 4099}) {
          const KvCase c{scheme, D, hkv, tokens};
          SCOPED_TRACE(std::string(scheme_name(scheme)) + " D=" + std::to_string(D) +
                       " Hkv=" + std::to_string(hkv) + " T=" + std::to_string(tokens));
          test::ProblemSpec spec;
          spec.requests = {{tokens - 1, 1}};
          spec.num_q_heads = hkv;
          spec.num_kv_heads = hkv;
          spec.head_dim = D;
          spec.data.head_range = 100.0f;
          spec.data.outlier_channels = 4;
          spec.seed = ++seed;
          test::AttentionProblem prob = test::make_problem(spec);
          test::KvScales scales = test::calibrate_scales(prob, scheme);
          // Scales a bit small, so that the largest values saturate at 448.
          for (float& s : scales.k) s *= 0.7f;
          for (float& s : scales.v) s *= 0.7f;
          // Special values in the first token (only when several tokens: the NaN-free cases
          // check the finite observation too).
          if (tokens >= 7) {
            const float specials[] = {std::numeric_limits<float>::quiet_NaN(),
                                      std::numeric_limits<float>::infinity(),
                                      -std::numeric_limits<float>::infinity(),
                                      1e30f,
                                      -1e-38f,
                                      1e-40f,
                                      -0.0f};
            for (size_t i = 0; i < std::size(specials); ++i) {
              prob.kv[i * 37 % prob.kv.size()] = float_to_bf16(specials[i]);
            }
          }
          std::vector<float> amax0(2 * hkv);
          for (int i = 0; i < 2 * hkv; ++i) amax0[i] = i % 3 == 0 ? 1000.0f : 0.5f * i;
          const KvResult want =
              run_quantize_kv(*cpu, c, prob.kv, prob.kv_slot, prob.num_slots, scales, amax0);
          const KvResult got =
              run_quantize_kv(*gpu, c, prob.kv, prob.kv_slot, prob.num_slots, scales, amax0);
          const KvResult plain =
              run_quantize_kv(*gpu, c, prob.kv, prob.kv_slot, prob.num_slots, scales, {});
          for (const KvResult* r : {&got, &plain}) {
            ASSERT_EQ(want.pool.size(), r->pool.size());
            size_t diffs = 0, first = 0;
            for (size_t i = 0; i < want.pool.size(); ++i) {
              if (want.pool[i] != r->pool[i] && diffs++ == 0) first = i;
            }
            EXPECT_EQ(diffs, 0u) << (r == &plain ? "unobserved" : "observed")
                                 << " write, first differing byte " << first << ": cpu "
                                 << int(want.pool[first]) << " gpu " << int(r->pool[first]);
          }
          for (int i = 0; i < 2 * hkv; ++i) {
            if (std::isnan(want.amax[i])) {
              EXPECT_TRUE(std::isnan(got.amax[i])) << "head " << i;
            } else {
              EXPECT_EQ(bits_of(want.amax[i]), bits_of(got.amax[i]))
                  << "head " << i << ": cpu " << want.amax[i] << " gpu " << got.amax[i];
            }
          }
        }
      }
    }
  }
}

// The slot-check tests' write: 50 tokens of 2 KV heads at D 128, fp8-per-head.
struct SlotCase {
  KvCase c;
  test::AttentionProblem prob;
  test::KvScales scales;
};
SlotCase slot_case() {
  SlotCase sc{{KvScheme::kFp8PerHead, 128, 2, 50}, {}, {}};
  test::ProblemSpec spec;
  spec.requests = {{49, 1}};
  spec.num_q_heads = 2;
  spec.num_kv_heads = 2;
  sc.prob = test::make_problem(spec);
  sc.scales = test::calibrate_scales(sc.prob, sc.c.scheme);
  return sc;
}

TEST(CudaQuantizeKv, OutOfRangeSlotWritesNothing) {
  SKIP_WITHOUT_GPU();
  auto gpu = make_cuda_backend();
  const auto [c, prob, scales] = slot_case();
  for (int32_t bad :
       {-1, static_cast<int32_t>(prob.num_slots), static_cast<int32_t>(prob.num_slots) + 1000}) {
    std::vector<int32_t> slots = prob.kv_slot;
    slots[31] = bad;
    slots[40] = bad;
    const std::vector<float> amax0(4, 0.25f);
    try {
      run_quantize_kv(*gpu, c, prob.kv, slots, prob.num_slots, scales, amax0);
      ADD_FAILURE() << "slot " << bad << " accepted";
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find("token 31"), std::string::npos) << msg;
      EXPECT_NE(msg.find("slot " + std::to_string(bad)), std::string::npos) << msg;
    }
  }
  // Nothing written: run the write by hand with the same buffers and look at them.
  std::vector<int32_t> slots = prob.kv_slot;
  slots[3] = -7;
  const size_t pool_bytes = static_cast<size_t>(prob.num_slots + 1) * 2 * 2 * 128;
  BackendBuffer pool(*gpu, pool_bytes);
  gpu->memset(pool.as<void>(), 0xab, pool_bytes);
  BackendBuffer d_kv(*gpu, prob.kv), d_slots(*gpu, slots), k(*gpu, scales.k), v(*gpu, scales.v);
  BackendBuffer amax(*gpu, std::vector<float>(4, 0.25f));
  QuantizeKvParams p;
  p.kv = d_kv.as<uint16_t>();
  p.slots = d_slots.as<int32_t>();
  p.num_tokens = c.num_tokens;
  p.cache = {pool.as<void>(), prob.num_slots, 2, 128, c.scheme};
  p.scales = {k.as<float>(), v.as<float>()};
  p.observe_amax = amax.as<float>();
  // The refusal surfaces at the next synchronization (no sync per call), then not again.
  gpu->quantize_kv(p);
  EXPECT_THROW(gpu->synchronize(), Error);
  EXPECT_NO_THROW(gpu->synchronize());
  for (uint8_t b : pool.download<uint8_t>()) ASSERT_EQ(b, 0xab);
  for (float a : amax.download<float>()) ASSERT_EQ(a, 0.25f);
}

// slots_unchanged (a step's later layers): the first layer's check stands for the same slots
// (a bad slot refuses every layer's write), and a promise about other slots, another count or
// another pool size is not taken: those are checked again.
TEST(CudaQuantizeKv, SlotsUnchangedKeepsTheCheckOfTheSameSlotsOnly) {
  SKIP_WITHOUT_GPU();
  auto gpu = make_cuda_backend();
  const SlotCase sc = slot_case();
  const test::AttentionProblem& prob = sc.prob;
  std::vector<int32_t> bad_slots = prob.kv_slot;
  bad_slots[17] = static_cast<int32_t>(prob.num_slots);
  const size_t pool_bytes = static_cast<size_t>(prob.num_slots + 1) * 2 * 2 * 128;
  BackendBuffer layer0(*gpu, pool_bytes), layer1(*gpu, pool_bytes);
  BackendBuffer d_kv(*gpu, prob.kv), good(*gpu, prob.kv_slot), bad(*gpu, bad_slots);
  BackendBuffer k(*gpu, sc.scales.k), v(*gpu, sc.scales.v);
  auto write = [&](BackendBuffer& pool, const BackendBuffer& slots, bool unchanged,
                   int64_t num_slots) {
    gpu->memset(pool.as<void>(), 0xab, pool_bytes);
    QuantizeKvParams p;
    p.kv = d_kv.as<uint16_t>();
    p.slots = slots.as<int32_t>();
    p.num_tokens = sc.c.num_tokens;
    p.cache = {pool.as<void>(), num_slots, 2, 128, sc.c.scheme};
    p.scales = {k.as<float>(), v.as<float>()};
    p.slots_unchanged = unchanged;
    gpu->quantize_kv(p);
  };
  auto untouched = [&](BackendBuffer& pool) {
    for (uint8_t b : pool.download<uint8_t>()) {
      if (b != 0xab) return false;
    }
    return true;
  };
  // A bad slot at layer 0: layer 1 under the promise is refused too.
  write(layer0, bad, false, prob.num_slots);
  write(layer1, bad, true, prob.num_slots);
  EXPECT_THROW(gpu->synchronize(), Error);
  EXPECT_TRUE(untouched(layer0));
  EXPECT_TRUE(untouched(layer1));
  // Good slots checked at layer 0, then a promise about other (bad) slots: checked, refused.
  write(layer0, good, false, prob.num_slots);
  write(layer1, bad, true, prob.num_slots);
  EXPECT_THROW(gpu->synchronize(), Error);
  EXPECT_FALSE(untouched(layer0));
  EXPECT_TRUE(untouched(layer1));
  // The same slots against a smaller pool (their largest slot out of range there): checked
  // again, refused.
  write(layer0, good, false, prob.num_slots);
  write(layer1, good, true, *std::max_element(prob.kv_slot.begin(), prob.kv_slot.end()));
  EXPECT_THROW(gpu->synchronize(), Error);
  EXPECT_TRUE(untouched(layer1));
  // Good slots under the promise: written, as the plain write does.
  write(layer0, good, false, prob.num_slots);
  write(layer1, good, true, prob.num_slots);
  EXPECT_NO_THROW(gpu->synchronize());
  EXPECT_EQ(layer0.download<uint8_t>(), layer1.download<uint8_t>());
}

// quantize_kv is a programmatic dependent launch (its CTAs may start while the kernel before it
// ends; it reads nothing before that kernel is done): three long writes back to back, no
// synchronization between them and no slot check (the same slots, promised unchanged), each
// reading or overwriting what the one before it touched. A bf16 write copies kv1 into the first T
// rows of pool A (consecutive slots: the rows then have an input's layout); an fp8-per-head write
// reads pool A as its input (read after write); a bf16 write of kv2 then overwrites pool A (write
// after read). Pool B must hold the CPU twin's bytes of kv1, pool A kv2. A write that did not wait
// for the one before it reads pool A half written or half overwritten.
TEST(CudaQuantizeKv, BackToBackWritesWaitForTheWriteBefore) {
  SKIP_WITHOUT_GPU();
  auto cpu = make_cpu_backend();
  auto gpu = make_cuda_backend();
  const int hkv = 8, D = 128;
  const int64_t T = 65536;  // 268 MB of bf16 a write: a launch of over a hundred microseconds
  const size_t elems = static_cast<size_t>(T) * 2 * hkv * D;
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  auto random_kv = [&] {
    std::vector<uint16_t> kv(elems);
    for (uint16_t& x : kv) x = float_to_bf16(normal(rng));
    return kv;
  };
  const std::vector<uint16_t> kv1 = random_kv(), kv2 = random_kv();
  std::vector<int32_t> slots(T);
  std::iota(slots.begin(), slots.end(), 0);
  test::KvScales scales;
  for (int h = 0; h < hkv; ++h) {
    scales.k.push_back(0.01f * (h + 1));  // the larger values saturate in the first heads
    scales.v.push_back(0.02f * (h + 1));
  }
  const KvCase fp8{KvScheme::kFp8PerHead, D, hkv, static_cast<int>(T)};
  const std::vector<uint8_t> want = run_quantize_kv(*cpu, fp8, kv1, slots, T, scales, {}).pool;

  const size_t rows_bytes = elems * 2;
  BackendBuffer pool_a(*gpu, rows_bytes + 2 * hkv * D * 2), pool_b(*gpu, want.size());
  BackendBuffer d_kv1(*gpu, kv1), d_kv2(*gpu, kv2), d_slots(*gpu, slots);
  BackendBuffer d_k(*gpu, scales.k), d_v(*gpu, scales.v);
  for (int round = 0; round < 2; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    gpu->memset(pool_a.as<void>(), 0, pool_a.bytes());
    gpu->memset(pool_b.as<void>(), 0xff, pool_b.bytes());
    QuantizeKvParams copy_in;
    copy_in.kv = d_kv1.as<uint16_t>();
    copy_in.slots = d_slots.as<int32_t>();
    copy_in.num_tokens = T;
    copy_in.cache = {pool_a.as<void>(), T, hkv, D, KvScheme::kBf16};
    QuantizeKvParams from_a = copy_in;
    from_a.kv = pool_a.as<uint16_t>();
    from_a.cache = {pool_b.as<void>(), T, hkv, D, KvScheme::kFp8PerHead};
    from_a.scales = {d_k.as<float>(), d_v.as<float>()};
    from_a.slots_unchanged = true;
    QuantizeKvParams over_a = copy_in;
    over_a.kv = d_kv2.as<uint16_t>();
    over_a.slots_unchanged = true;
    gpu->quantize_kv(copy_in);
    gpu->quantize_kv(from_a);
    gpu->quantize_kv(over_a);
    gpu->synchronize();
    const std::vector<uint8_t> got_b = pool_b.download<uint8_t>();
    ASSERT_EQ(got_b.size(), want.size());
    size_t diffs = 0;
    for (size_t i = 0; i < want.size(); ++i) diffs += want[i] != got_b[i];
    EXPECT_EQ(diffs, 0u) << "bytes of the fp8 write that read pool A before the bf16 write "
                            "finished, or after the next one began";
    const std::vector<uint16_t> got_a = pool_a.download<uint16_t>();
    EXPECT_TRUE(std::equal(kv2.begin(), kv2.end(), got_a.begin()))
        << "pool A is not the last write's kv2";
  }
}

TEST(CudaQuantizeKv, RefusesBadArguments) {
  SKIP_WITHOUT_GPU();
  auto gpu = make_cuda_backend();
  BackendBuffer pool(*gpu, 1 << 16), kv(*gpu, 1 << 16), slots(*gpu, 1024);
  QuantizeKvParams p;
  p.kv = kv.as<uint16_t>();
  p.slots = slots.as<int32_t>();
  p.num_tokens = 4;
  p.cache = {pool.as<void>(), 16, 2, 96, KvScheme::kBf16};
  EXPECT_THROW(gpu->quantize_kv(p), Error);  // head_dim 96
  p.cache.head_dim = 64;
  p.cache.scheme = KvScheme::kFp8PerTensor;
  EXPECT_THROW(gpu->quantize_kv(p), Error);  // no scales
}

struct QResult {
  std::vector<uint8_t> q_fp8;
  std::vector<float> q_scale;
  std::vector<float> amax;  // observe_amax after the call, when `observe` was given
};

// `observe`: the running abs-max [Hkv] to start from (calibrate --q-scales), or null.
QResult run_quantize_q(Backend& be, const test::AttentionProblem& prob,
                       const std::vector<float>* static_scale,
                       const std::vector<float>* observe = nullptr) {
  BackendBuffer q(be, prob.q), cu(be, prob.cu_seqlens_q);
  BackendBuffer q8(be, prob.q.size()),
      qs(be, prob.num_requests() * prob.num_kv_heads * sizeof(float));
  be.memset(q8.as<void>(), 0xee, prob.q.size());
  std::unique_ptr<BackendBuffer> st, am;
  if (static_scale) st = std::make_unique<BackendBuffer>(be, *static_scale);
  if (observe) am = std::make_unique<BackendBuffer>(be, *observe);
  QuantizeQParams p;
  p.q = q.as<uint16_t>();
  p.q_fp8 = q8.as<uint8_t>();
  p.q_scale = qs.as<float>();
  p.static_scale = st ? st->as<float>() : nullptr;
  p.observe_amax = am ? am->as<float>() : nullptr;
  p.cu_seqlens_q = cu.as<int32_t>();
  p.num_requests = prob.num_requests();
  p.total_q = prob.total_q();
  p.num_q_heads = prob.num_q_heads;
  p.num_kv_heads = prob.num_kv_heads;
  p.head_dim = prob.head_dim;
  be.quantize_q(p);
  be.synchronize();
  return {q8.download<uint8_t>(), qs.download<float>(),
          am ? am->download<float>() : std::vector<float>{}};
}

TEST(CudaQuantizeQ, ByteIdenticalToCpu) {
  SKIP_WITHOUT_GPU();
  auto cpu = make_cpu_backend();
  auto gpu = make_cuda_backend();
  uint64_t seed = 500;
  for (int D : {64, 128, 256}) {
    for (int group : {1, 4, 8}) {
      for (bool use_static : {false, true}) {
        SCOPED_TRACE("D=" + std::to_string(D) + " group=" + std::to_string(group) +
                     (use_static ? " static" : " dynamic"));
        test::ProblemSpec spec;
        spec.requests = {{0, 1}, {5, 7}, {0, 127}, {3, 0}, {0, 300}};
        spec.num_kv_heads = 3;
        spec.num_q_heads = 3 * group;
        spec.head_dim = D;
        spec.data.head_range = 50.0f;
        spec.seed = ++seed;
        test::AttentionProblem prob = test::make_problem(spec);
        prob.q[17] = float_to_bf16(1e30f);  // saturates under a static scale
        const std::vector<float> st = {0.01f, 0.02f, 0.5f};
        const QResult want = run_quantize_q(*cpu, prob, use_static ? &st : nullptr);
        const QResult got = run_quantize_q(*gpu, prob, use_static ? &st : nullptr);
        ASSERT_EQ(want.q_fp8, got.q_fp8);
        ASSERT_EQ(want.q_scale.size(), got.q_scale.size());
        for (size_t i = 0; i < want.q_scale.size(); ++i)
          EXPECT_EQ(bits_of(want.q_scale[i]), bits_of(got.q_scale[i])) << i;
      }
    }
  }
}

// observe_amax (calibrate --q-scales): the same running abs-max per KV head as the CPU twin, bit
// for bit, in the pass that quantizes, static scale or dynamic; the bytes and scales unchanged;
// NaN wins. Awkward sizes: 1, 7, 127 and 1170 tokens per request, GQA 1/4/8.
TEST(CudaQuantizeQ, ObservedAmaxMatchesCpu) {
  SKIP_WITHOUT_GPU();
  auto cpu = make_cpu_backend();
  auto gpu = make_cuda_backend();
  uint64_t seed = 900;
  for (int D : {64, 128, 256}) {
    for (int group : {1, 4, 8}) {
      for (bool use_static : {false, true}) {
        SCOPED_TRACE("D=" + std::to_string(D) + " group=" + std::to_string(group) +
                     (use_static ? " static" : " dynamic"));
        test::ProblemSpec spec;
        spec.requests = {{0, 1}, {5, 7}, {0, 127}, {3, 1170}};
        spec.num_kv_heads = 3;
        spec.num_q_heads = 3 * group;
        spec.head_dim = D;
        spec.data.head_range = 50.0f;
        spec.seed = ++seed;
        test::AttentionProblem prob = test::make_problem(spec);
        const std::vector<float> st = {0.01f, 0.02f, 0.5f};
        const std::vector<float> start = {0.0f, 1e6f, 3.0f};  // head 1 keeps its larger old max
        const QResult plain = run_quantize_q(*gpu, prob, use_static ? &st : nullptr);
        const QResult want = run_quantize_q(*cpu, prob, use_static ? &st : nullptr, &start);
        const QResult got = run_quantize_q(*gpu, prob, use_static ? &st : nullptr, &start);
        ASSERT_EQ(got.q_fp8, plain.q_fp8);
        ASSERT_EQ(got.q_fp8, want.q_fp8);
        ASSERT_EQ(want.amax.size(), got.amax.size());
        for (size_t g = 0; g < want.amax.size(); ++g)
          EXPECT_EQ(bits_of(want.amax[g]), bits_of(got.amax[g])) << "head " << g;
        EXPECT_EQ(got.amax[1], 1e6f);
        for (size_t i = 0; i < want.q_scale.size(); ++i)
          EXPECT_EQ(bits_of(plain.q_scale[i]), bits_of(got.q_scale[i])) << i;
        prob.q[(static_cast<size_t>(prob.cu_seqlens_q[2]) * prob.num_q_heads + 2 * group) * D + 3] =
            float_to_bf16(NAN);
        const QResult nan = run_quantize_q(*gpu, prob, &st, &start);
        EXPECT_TRUE(std::isnan(nan.amax[2]));
        EXPECT_EQ(bits_of(nan.amax[0]), bits_of(want.amax[0]));
      }
    }
  }
}

}  // namespace
}  // namespace fp8kv
