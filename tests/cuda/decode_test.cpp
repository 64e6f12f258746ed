// Decode attention on the GPU against its CPU twin and a float64 reference, on fresh random data
// with outliers: lengths 1, 7, 127, 4100 (no split and split-KV), GQA 1/4/8, head_dim 64/128/256,
// every scheme (fp8-e5m2 and fp8-per-head-bf16q too); grids of many waves (the persistent kernel:
// the twin, repeated launches and the bits of one-item CTAs; a refused request skipped); a
// long case (33k keys) whose FP8 error
// must not grow with length; split merges repeated across shapes on one workspace, and many
// splits of several requests launched twice on a workspace of the test's own (the merge's counters
// back at zero after every launch); splits of one-wave launches merged in clusters against the
// twin; bad arguments refused; a request index out of range skipped on
// the device and reported at sync. One decode kernel per scheme (decode_mma_kernel.cuh, tensor
// cores); the CPU twin is its oracle. The split heuristic's tests are in
// tests/kernels/decode_split_test.cpp.
//
// Criterion (STYLE.md): errors are normalized ||o - ref|| / ||ref|| against float64 attention on
// the inputs as the scheme rounds them (emulated_inputs), so the test measures the kernel's own
// error, not the FP8 quantization. The CPU twin rounds P to e4m3 for fp8-per-head (it models the
// tensor-core prefill); the GPU decode kernel rounds P to fp16 (FP8 caches, 2^-11 relative) or
// bf16 (bf16 cache, 2^-8: the error of the bf16 inputs themselves) for the PV product, so its
// error stays near bf16 output rounding plus fp32 accumulation: bounded by
// max(1.5 * cpu_error, 4e-3) overall and 2e-2 per row. No NaN ever passes.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <iterator>
#include <string>
#include <vector>

#include "fp8kv/backend.h"
#include "fp8kv/error.h"
#include "gpu_skip.h"
#include "kernel_test_util.h"
#include "kernels/cuda/check.h"
#include "kernels/cuda/launchers.h"
#include "kernels/decode_split.h"

namespace fp8kv {
namespace {

constexpr double kOverallFloor = 4e-3;
constexpr double kRowBound = 2e-2;

std::vector<test::RequestShape> decode_requests(const std::vector<int>& lengths) {
  std::vector<test::RequestShape> r;
  for (int len : lengths) r.push_back({len - 1, 1});
  return r;
}

// A problem's batch arrays in device memory, and the AttentionBatch over them.
struct DeviceBatch {
  BackendBuffer seq, cu, ri, rt;
  DeviceBatch(Backend& be, const test::AttentionProblem& prob)
      : seq(be, prob.seq_len),
        cu(be, prob.cu_seqlens_q),
        ri(be, prob.req_index),
        rt(be, prob.req_to_token) {}
  AttentionBatch batch(const test::AttentionProblem& prob) const {
    return prob.batch(seq.as<int32_t>(), cu.as<int32_t>(), ri.as<int32_t>(), rt.as<int32_t>());
  }
};

// A bf16 pool of ones (V = 1 everywhere, so every computed output is exactly 1.0), Q, O and the
// batch arrays of `prob` on the GPU; params() reads the request indices from `req_index` (the
// problem's own when null).
struct OnesPool {
  const test::AttentionProblem& prob;
  BackendBuffer pool, q, o;
  DeviceBatch db;
  int rows;  // of req_to_token: max_requests
  OnesPool(Backend& gpu, const test::AttentionProblem& problem)
      : prob(problem),
        pool(gpu, std::vector<uint16_t>(problem.pool_elements(), 0x3f80)),
        q(gpu, problem.q),
        o(gpu, problem.q.size() * sizeof(uint16_t)),
        db(gpu, problem),
        rows(static_cast<int>(problem.req_to_token.size() / problem.max_len)) {}
  AttentionParams params(const int32_t* req_index = nullptr) const {
    AttentionParams p;
    p.q = q.as<uint16_t>();
    p.o = o.as<uint16_t>();
    p.num_q_heads = prob.num_q_heads;
    p.cache = {pool.as<void>(), prob.num_slots, prob.num_kv_heads, prob.head_dim, KvScheme::kBf16};
    p.batch =
        prob.batch(db.seq.as<int32_t>(), db.cu.as<int32_t>(),
                   req_index != nullptr ? req_index : db.ri.as<int32_t>(), db.rt.as<int32_t>());
    return p;
  }
};

struct DecodeErrors {
  test::ErrorStats gpu_emulated, cpu_emulated, gpu_exact, gpu_vs_cpu;
};

// The decode kernels every case runs.
struct KernelVariant {
  int variant;
  const char* name;
};
constexpr KernelVariant kVariants[] = {{0, "mma"}};

// One problem, the CPU twin once, each GPU kernel variant on the same data: errors per variant
// (in kVariants order).
std::vector<DecodeErrors> run_case(Backend& cpu, Backend& gpu, const test::AttentionProblem& prob,
                                   KvScheme scheme, float softmax_scale = 0.0f) {
  const test::KvScales scales = test::calibrate_scales(prob, scheme);
  test::RunOptions opt;
  opt.phase = AttentionPhase::kDecode;
  opt.softmax_scale = softmax_scale;
  const test::AttentionRun c = test::run_attention(cpu, prob, scheme, scales, opt);
  const auto ref_em =
      test::reference_attention(prob, test::emulated_inputs(prob, scheme, scales), softmax_scale);
  const auto ref_ex = test::reference_attention(prob, test::exact_inputs(prob), softmax_scale);
  const auto cpu_o = test::bf16_to_double(c.o);
  const test::ErrorStats cpu_em = test::compare(c.o, ref_em, prob.head_dim);
  std::vector<DecodeErrors> out;
  for ([[maybe_unused]] const KernelVariant& v : kVariants) {
    const test::AttentionRun g = test::run_attention(gpu, prob, scheme, scales, opt);
    DecodeErrors e;
    e.gpu_emulated = test::compare(g.o, ref_em, prob.head_dim);
    e.cpu_emulated = cpu_em;
    e.gpu_exact = test::compare(g.o, ref_ex, prob.head_dim);
    e.gpu_vs_cpu = test::compare(g.o, cpu_o, prob.head_dim);
    out.push_back(e);
  }
  return out;
}

std::vector<DecodeErrors> run_case(Backend& cpu, Backend& gpu, const test::ProblemSpec& spec,
                                   KvScheme scheme, float softmax_scale = 0.0f) {
  return run_case(cpu, gpu, test::make_problem(spec), scheme, softmax_scale);
}

void expect_close(const DecodeErrors& e) {
  EXPECT_EQ(e.gpu_emulated.nonfinite, 0);
  EXPECT_LE(e.gpu_emulated.normalized, std::max(1.5 * e.cpu_emulated.normalized, kOverallFloor))
      << "gpu " << e.gpu_emulated.str() << " | cpu " << e.cpu_emulated.str();
  EXPECT_LE(e.gpu_emulated.max_row, kRowBound) << e.gpu_emulated.str();
}
void expect_close(const std::vector<DecodeErrors>& per_variant) {
  ASSERT_EQ(per_variant.size(), std::size(kVariants));
  for (size_t i = 0; i < per_variant.size(); ++i) {
    SCOPED_TRACE(std::string("kernel ") + kVariants[i].name);
    expect_close(per_variant[i]);
  }
}

TEST(CudaDecode, MatchesCpuTwin) {
  SKIP_WITHOUT_GPU();
  auto cpu = make_cpu_backend();
  auto gpu = make_cuda_backend();
  uint64_t seed = 1000;
  for (KvScheme scheme : kAllSchemes) {
    for (int D : {64, 128, 256}) {
      for (int group : {1, 4, 8}) {
        // max_seq_len 127: one CTA per (request, head); 4100: split over the KV length.
        for (const std::vector<int>& lengths :
             {std::vector<int>{1, 7, 127}, std::vector<int>{127, 1, 4100, 7},
              std::vector<int>{17, 64, 65, 300}}) {
          test::ProblemSpec spec;
          spec.requests = decode_requests(lengths);
          spec.num_kv_heads = 2;
          spec.num_q_heads = 2 * group;
          spec.head_dim = D;
          spec.data.head_range = 30.0f;
          spec.data.outlier_channels = 4;
          spec.seed = ++seed;
          SCOPED_TRACE(std::string(scheme_name(scheme)) + " D=" + std::to_string(D) +
                       " group=" + std::to_string(group) + " max_len=" +
                       std::to_string(*std::max_element(lengths.begin(), lengths.end())));
          expect_close(run_case(*cpu, *gpu, spec, scheme));
        }
      }
    }
  }
}

// A long row with an attention sink (test::make_sink_problem: one key with p ~ 1, 8191 with p
// ~ 3e-4 and values of the other sign): the decode kernels keep the diffuse tail (the FP8 schemes
// within the twin's bounds, i.e. P's and the accumulation's rounding do not drop it).
TEST(CudaDecode, KeepsTheDiffuseTailOfALongRow) {
  SKIP_WITHOUT_GPU();
  auto cpu = make_cpu_backend();
  auto gpu = make_cuda_backend();
  const test::AttentionProblem p = test::make_sink_problem(8192, 1, 128, 92);
  for (KvScheme scheme : kAllSchemes) {
    SCOPED_TRACE(scheme_name(scheme));
    expect_close(run_case(*cpu, *gpu, p, scheme));
  }
}

TEST(CudaDecode, OddGroupsBigBatchAndSoftmaxScale) {
  SKIP_WITHOUT_GPU();
  auto cpu = make_cpu_backend();
  auto gpu = make_cuda_backend();
  // Group 3 and 12 (padded / chunked query heads), a batch of 300 requests, an explicit scale.
  struct Case {
    int hkv, group, batch, len;
    float sm;
  };
  for (const Case& c : {Case{2, 3, 5, 900, 0.0f}, Case{1, 12, 3, 2000, 0.05f},
                        Case{4, 2, 300, 300, 0.0f}, Case{3, 7, 4, 700, 0.0f}}) {
    for (KvScheme scheme : kAllSchemes) {
      test::ProblemSpec spec;
      spec.requests.clear();
      for (int b = 0; b < c.batch; ++b) spec.requests.push_back({(c.len * (b + 1)) / c.batch, 1});
      spec.num_kv_heads = c.hkv;
      spec.num_q_heads = c.hkv * c.group;
      spec.head_dim = 128;
      spec.data.outlier_channels = 2;
      spec.seed = 77 + c.group;
      SCOPED_TRACE(std::string(scheme_name(scheme)) + " group=" + std::to_string(c.group) +
                   " B=" + std::to_string(c.batch));
      expect_close(run_case(*cpu, *gpu, spec, scheme, c.sm));
    }
  }
}

// The backend's next synchronize() throws an Error that says `want` (a refusal a kernel recorded
// on the device).
void expect_refusal_at_synchronize(Backend& gpu, const std::string& want) {
  try {
    gpu.synchronize();
    ADD_FAILURE() << "no error at synchronize; expected: " << want;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(want), std::string::npos) << e.what();
  }
}

// The decode launch that `prob` takes (decode_launch_key's fields), given a decode_order or not
// (the plan only asks whether there is one).
cuda::DecodeLaunchKey launch_key(const test::AttentionProblem& prob, KvScheme scheme,
                                 bool ordered = false, bool slots_in_pages = false) {
  static const int32_t some_order = 0;
  AttentionParams p;
  p.num_q_heads = prob.num_q_heads;
  p.cache = {nullptr, prob.num_slots, prob.num_kv_heads, prob.head_dim, scheme};
  p.batch = prob.batch(nullptr, nullptr, nullptr, nullptr);
  if (ordered) p.batch.decode_order = &some_order;
  p.batch.slots_in_pages = slots_in_pages;
  return cuda::DecodeLaunchKey::unpack(cuda::decode_launch_key(p));
}

// Whether the launch of `prob` takes the persistent kernel.
bool takes_persistent(const test::AttentionProblem& prob, KvScheme scheme) {
  return launch_key(prob, scheme).persistent;
}

// Two launches of the same decode: the second gives the first's bits (the counters back at zero
// after a launch; no arrival or dealing order in the bits). Returns the first.
test::AttentionRun run_twice_same_bits(Backend& gpu, const test::AttentionProblem& prob,
                                       KvScheme scheme, const test::KvScales& scales) {
  test::RunOptions opt;
  opt.phase = AttentionPhase::kDecode;
  test::AttentionRun first = test::run_attention(gpu, prob, scheme, scales, opt);
  const test::AttentionRun again = test::run_attention(gpu, prob, scheme, scales, opt);
  EXPECT_TRUE(first.o == again.o) << "a repeated launch gave different bits";
  return first;
}

// Unsplit grids of two waves or more take the persistent kernel (decode_persistent: CTAs that
// deal themselves (request, head group) items from a counter, a producer warp streaming ahead
// across items). 300 requests of 1..256 keys (single-key ones, tile edges 64 / 65 / 128 and a
// run of one length among them) over 8 KV heads, every scheme and head dim, GQA 1 / 4 / 7 (7:
// a padded group): it matches the CPU twin; launched twice in a row (the counters back at zero
// after each launch) it gives the same bits; and the first 12 requests alone, a launch of one-item
// CTAs, give the bits they have inside the persistent launch.
TEST(CudaDecode, PersistentKernelMatchesTheTwinAndOneItemCtas) {
  SKIP_WITHOUT_GPU();
  auto cpu = make_cpu_backend();
  auto gpu = make_cuda_backend();
  for (KvScheme scheme : kAllSchemes) {
    for (int D : {64, 128, 256}) {
      test::ProblemSpec spec;
      spec.requests.clear();
      for (int b = 0; b < 300; ++b) {
        const int len = b < 8    ? std::vector<int>{1, 64, 65, 128, 129, 256, 2, 63}[b]
                        : b < 40 ? 200
                                 : 1 + (b * 97) % 256;
        spec.requests.push_back({len - 1, 1});
      }
      spec.num_kv_heads = 8;
      spec.num_q_heads = 8 * (D == 64 ? 1 : D == 128 ? 4 : 7);
      spec.head_dim = D;
      spec.data.outlier_channels = 2;
      spec.seed = 950 + D + 7 * static_cast<int>(scheme);
      SCOPED_TRACE(std::string(scheme_name(scheme)) + " D=" + std::to_string(D));
      const test::AttentionProblem prob = test::make_problem(spec);
      EXPECT_TRUE(takes_persistent(prob, scheme));
      const std::vector<DecodeErrors> es = run_case(*cpu, *gpu, prob, scheme);
      expect_close(es);

      const test::KvScales scales = test::calibrate_scales(prob, scheme);
      const test::AttentionRun first = run_twice_same_bits(*gpu, prob, scheme, scales);
      test::RunOptions opt;
      opt.phase = AttentionPhase::kDecode;
      opt.launch_requests = 12;
      test::AttentionProblem head = prob;
      head.seq_len.resize(12);
      ASSERT_FALSE(takes_persistent(head, scheme));
      const test::AttentionRun part = test::run_attention(*gpu, prob, scheme, scales, opt);
      const size_t rows = static_cast<size_t>(12) * prob.num_q_heads * prob.head_dim;
      EXPECT_TRUE(std::equal(part.o.begin(), part.o.begin() + rows, first.o.begin()))
          << "requests 0..11 alone differ from the same requests in the persistent launch";
    }
  }
}

// AttentionBatch::decode_order (longest first, as the model runner makes it): where a launch
// would take the persistent kernel, e4m3 at head_dim 128 takes one-item CTAs in that order
// instead (decode_order_replaces_persistent), the other schemes and head dims keep the persistent
// kernel; a one-wave launch passes the order to its one-item CTAs. Every scheme, head_dim 64 and
// 128, 300 requests of mixed lengths (two waves and more) on scattered slots, and 12 requests (one
// wave) in reverse order: the bits are those of the launch without an order (the persistent
// kernel's bits are the twin's: PersistentKernelMatchesTheTwinAndOneItemCtas), and the 300 match
// the CPU twin at head_dim 128.
TEST(CudaDecode, DecodeOrderKeepsTheBitsAndTakesOneItemCtasForE4m3At128) {
  SKIP_WITHOUT_GPU();
  auto cpu = make_cpu_backend();
  auto gpu = make_cuda_backend();
  std::vector<int> lengths;
  for (int b = 0; b < 300; ++b) lengths.push_back(b < 40 ? 1 + b * 53 : 1 + (b * 97) % 700);
  uint64_t seed = 8300;
  for (KvScheme scheme : kAllSchemes) {
    for (int D : {64, 128}) {
      for (const int requests : {300, 12}) {
        test::ProblemSpec spec;
        // The 12 of at most 256 keys: no split (a split launch merges by request, in index
        // order).
        spec.requests = decode_requests(
            requests == 300 ? lengths
                            : std::vector<int>{1, 64, 65, 200, 3, 256, 17, 128, 129, 2, 90, 255});
        spec.num_kv_heads = 8;
        spec.num_q_heads = 32;
        spec.head_dim = D;
        spec.data.outlier_channels = 2;
        spec.seed = ++seed;
        const test::AttentionProblem prob = test::make_problem(spec);
        SCOPED_TRACE(std::string(scheme_name(scheme)) + " D=" + std::to_string(D) +
                     " requests=" + std::to_string(requests));
        test::RunOptions opt;
        opt.phase = AttentionPhase::kDecode;
        opt.decode_order = decode_order_longest_first(prob.seq_len.data(), requests);
        if (requests == 12) std::reverse(opt.decode_order.begin(), opt.decode_order.end());
        const cuda::DecodeLaunchKey plain = launch_key(prob, scheme);
        const cuda::DecodeLaunchKey ordered = launch_key(prob, scheme, true);
        ASSERT_EQ(plain.num_splits, 1);
        const bool replaces = kv_elem_bytes(scheme) == 1 && D == 128;
        EXPECT_EQ(plain.persistent, requests == 300);
        EXPECT_FALSE(plain.ordered);
        EXPECT_EQ(ordered.persistent, requests == 300 && !replaces);
        // One wave of one-item CTAs (the 12): FP8 at head_dim 128 gathers its scattered rows
        // with its lanes (DecodeArgs::gather_rows); 300 requests' CTAs make several waves.
        EXPECT_EQ(ordered.gather_rows, requests == 12);
        EXPECT_EQ(ordered.ordered, !ordered.persistent);
        const test::KvScales scales = test::calibrate_scales(prob, scheme);
        test::RunOptions none = opt;
        none.decode_order.clear();
        const std::vector<uint16_t> base = test::run_attention(*gpu, prob, scheme, scales, none).o;
        const std::vector<uint16_t> in_order =
            test::run_attention(*gpu, prob, scheme, scales, opt).o;
        EXPECT_TRUE(in_order == base) << "the ordered launch gave other bits";
        if (requests == 300 && replaces) expect_close(run_case(*cpu, *gpu, prob, scheme));
      }
    }
  }
}

// An entry of decode_order outside [0, B) (the device's check: the host cannot read it without a
// synchronization) is refused at synchronize by name, whichever kernel the shape takes: an
// unsplit ordered launch (which skips the entry: no CTA takes request 0 there), and a split and
// a persistent launch, which do not read the order (every request computed in index order).
TEST(CudaDecode, DecodeOrderEntryOutOfRangeIsReportedAtSynchronize) {
  SKIP_WITHOUT_GPU();
  auto gpu = make_cuda_backend();
  enum Kind { kOrdered, kSplit, kPersistent };
  const std::pair<Kind, std::vector<int>> cases[] = {
      {kOrdered, {5, 9, 70}}, {kSplit, {300, 20000}}, {kPersistent, std::vector<int>(900, 7)}};
  for (const auto& [kind, lengths] : cases) {
    test::ProblemSpec spec;
    spec.requests = decode_requests(lengths);
    const test::AttentionProblem prob = test::make_problem(spec);
    const int B = static_cast<int>(lengths.size());
    const cuda::DecodeLaunchKey key = launch_key(prob, KvScheme::kBf16, true);
    SCOPED_TRACE("requests " + std::to_string(B) + ", splits " + std::to_string(key.num_splits) +
                 (key.persistent ? ", persistent" : "") + (key.ordered ? ", ordered" : ""));
    ASSERT_EQ(key.ordered, kind == kOrdered);
    ASSERT_EQ(key.num_splits > 1, kind == kSplit);
    ASSERT_EQ(key.persistent, kind == kPersistent);
    const OnesPool ones(*gpu, prob);
    for (const int32_t bad : {B, -1}) {
      std::vector<int32_t> order(B);
      for (int b = 0; b < B; ++b) order[b] = b;
      order[0] = 1;
      order[1] = bad;
      BackendBuffer order_buffer(*gpu, order);
      AttentionParams p = ones.params();
      p.batch.decode_order = order_buffer.as<int32_t>();
      gpu->memset(ones.o.as<void>(), 0xff, ones.o.bytes());
      gpu->decode_attention(p);
      expect_refusal_at_synchronize(
          *gpu, "decode_attention: batch.decode_order[1] = " + std::to_string(bad) +
                    " out of [0, num_requests " + std::to_string(B) + ")");
      EXPECT_NO_THROW(gpu->synchronize());  // reported once
      const std::vector<uint16_t> out = ones.o.download<uint16_t>();
      const size_t row = static_cast<size_t>(prob.num_q_heads) * prob.head_dim;
      for (int b = 0; b < B; ++b) {
        const uint16_t want = b == 0 && kind == kOrdered ? 0xffff : 0x3f80;  // untouched or ones
        for (size_t i = 0; i < row; ++i) {
          ASSERT_EQ(out[b * row + i], want) << "request " << b << ", element " << i;
        }
      }
    }
  }
}

// The CUDA backend's debug mode (FP8KV_CUDA_CHECK_BATCH=1: the batch arrays copied back and checked
// on the host in every call) refuses an order that is not a permutation at the call, by name,
// before anything is written; a permutation passes.
TEST(CudaDecode, DecodeOrderCheckedOnTheHostInCheckMode) {
  SKIP_WITHOUT_GPU();
  setenv("FP8KV_CUDA_CHECK_BATCH", "1", 1);
  auto gpu = make_cuda_backend();
  unsetenv("FP8KV_CUDA_CHECK_BATCH");
  test::ProblemSpec spec;
  spec.requests = decode_requests({5, 9, 70});
  const test::AttentionProblem prob = test::make_problem(spec);
  const OnesPool ones(*gpu, prob);
  BackendBuffer repeated(*gpu, std::vector<int32_t>{2, 0, 2});
  AttentionParams p = ones.params();
  p.batch.decode_order = repeated.as<int32_t>();
  gpu->memset(ones.o.as<void>(), 0xff, ones.o.bytes());
  try {
    gpu->decode_attention(p);
    ADD_FAILURE() << "a repeated decode_order entry passed the host check";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("batch.decode_order[2] = 2 repeats an earlier entry"),
              std::string::npos)
        << e.what();
  }
  gpu->synchronize();
  for (uint16_t x : ones.o.download<uint16_t>()) ASSERT_EQ(x, 0xffff);  // nothing written
  BackendBuffer good(*gpu, std::vector<int32_t>{2, 0, 1});
  p.batch.decode_order = good.as<int32_t>();
  gpu->decode_attention(p);
  EXPECT_NO_THROW(gpu->synchronize());
  for (uint16_t x : ones.o.download<uint16_t>()) ASSERT_EQ(x, 0x3f80);  // ones everywhere
}

// Where a warp's rows of a tile sit in consecutive slots, both decode kernels copy them as one
// box (DecodeKvMaps), the others a copy a row. The same batch with its slots scattered, with each
// request's slots consecutive, and consecutive but for two swapped slots in every other request
// (one warp's rows of a tile copied a row each, the rest of that tile boxed) gives the same output
// bits: every scheme, head_dim 64, 128 and 256, 8 KV heads and 3 (a CTA or item of fewer heads at
// the end), one-item CTAs unsplit and split, and the persistent kernel (head_dim 64 and 128);
// the partly consecutive one-item batches match the CPU twin at head_dim 128 (the scattered ones
// are the other tests' batches).
TEST(CudaDecode, ConsecutiveSlotsGiveTheBitsOfScatteredOnes) {
  SKIP_WITHOUT_GPU();
  auto cpu = make_cpu_backend();
  auto gpu = make_cuda_backend();
  test::RunOptions opt;
  opt.phase = AttentionPhase::kDecode;
  std::vector<int> persistent_lengths;
  for (int b = 0; b < 300; ++b) persistent_lengths.push_back(b < 40 ? 200 : 1 + (b * 97) % 256);
  const std::vector<std::vector<int>> batches = {
      {1, 63, 64, 65, 200, 256}, {1, 65, 200, 4100}, persistent_lengths};
  uint64_t seed = 7100;
  for (KvScheme scheme : kAllSchemes) {
    for (int D : {64, 128, 256}) {
      for (const std::vector<int>& lengths : batches) {
        // The persistent batch at head_dim 64 and 128 only: its 300 requests' data at 256 cost
        // more host time than the GPU runs, and the boxes do not depend on the head_dim.
        if (lengths.size() == 300 && D == 256) continue;
        for (int kv_heads : {8, 3}) {
          test::ProblemSpec spec;
          spec.requests = decode_requests(lengths);
          spec.num_kv_heads = kv_heads;
          spec.num_q_heads = 4 * kv_heads;
          spec.head_dim = D;
          spec.data.outlier_channels = 2;
          spec.seed = ++seed;
          const test::AttentionProblem scattered = test::make_problem(spec);
          SCOPED_TRACE(std::string(scheme_name(scheme)) + " D=" + std::to_string(D) + " requests=" +
                       std::to_string(lengths.size()) + " Hkv=" + std::to_string(kv_heads));
          if (kv_heads == 8) {
            EXPECT_EQ(takes_persistent(scattered, scheme), lengths.size() == 300);
          }
          const test::KvScales scales = test::calibrate_scales(scattered, scheme);
          const std::vector<uint16_t> base =
              test::run_attention(*gpu, scattered, scheme, scales, opt).o;
          for (int break_every : {0, 2}) {
            SCOPED_TRACE("break_every=" + std::to_string(break_every));
            const test::AttentionProblem runs =
                test::with_consecutive_slots(scattered, break_every);
            EXPECT_TRUE(test::run_attention(*gpu, runs, scheme, scales, opt).o == base)
                << "consecutive slots gave other bits than scattered ones";
            if (D == 128 && break_every == 2 && lengths.size() < 300) {
              expect_close(run_case(*cpu, *gpu, runs, scheme));
            }
          }
        }
      }
    }
  }
}

// After its first round the persistent kernel deals the items longest first (a stable counting
// sort of the requests by their tiles, which every CTA builds alike): a batch whose lengths fall
// in many buckets (the order built), one of a single length (one bucket: index order, no sort) and
// one of more requests than the order holds (about 7800: index order) match the CPU twin and give
// the same bits when launched again.
TEST(CudaDecode, PersistentLongestFirstOrdersMatchTheTwin) {
  SKIP_WITHOUT_GPU();
  auto cpu = make_cpu_backend();
  auto gpu = make_cuda_backend();
  struct Case {
    const char* name;
    int batch;
    int (*len)(int b);
  };
  // Sizes kept small (the twin and the float64 references are slow per token), but every batch
  // of at least two waves of items (fp8: 2 items a request, bf16: 4; 132 CTAs on an H200).
  for (const Case& c : {Case{"many buckets", 150, [](int b) { return 1 + (b * 193) % 700; }},
                        Case{"one length", 300, [](int) { return 64; }},
                        Case{"beyond the order", 9000, [](int b) { return 1 + (b * 37) % 9; }}}) {
    for (KvScheme scheme : {KvScheme::kFp8PerHead, KvScheme::kBf16}) {
      if (c.batch > 1000 && scheme == KvScheme::kBf16) continue;  // one scheme is enough there
      SCOPED_TRACE(std::string(c.name) + " " + scheme_name(scheme));
      test::ProblemSpec spec;
      spec.requests.clear();
      for (int b = 0; b < c.batch; ++b) spec.requests.push_back({c.len(b) - 1, 1});
      spec.num_kv_heads = 8;
      spec.num_q_heads = 32;
      spec.head_dim = 128;
      spec.data.outlier_channels = 2;
      spec.seed = 1300 + c.batch;
      const test::AttentionProblem prob = test::make_problem(spec);
      ASSERT_TRUE(takes_persistent(prob, scheme));
      expect_close(run_case(*cpu, *gpu, prob, scheme));
      run_twice_same_bits(*gpu, prob, scheme, test::calibrate_scales(prob, scheme));
    }
  }
}

// The kernel's own error must not grow with the context (the FA3 FP8 long-context failure:
// accumulating many tiles in one low-precision level): 33k keys vs 1k keys, measured against
// float64 attention on the same FP8-rounded inputs. Against the exact bf16 inputs the normalized
// error does grow here, for both backends alike: it is the FP8 rounding of the inputs, and the
// reference's norm shrinks as attention averages more random V rows; the GPU must match the CPU
// twin there.
TEST(CudaDecode, LongContextErrorDoesNotGrow) {
  SKIP_WITHOUT_GPU();
  auto cpu = make_cpu_backend();
  auto gpu = make_cuda_backend();
  for (KvScheme scheme : {KvScheme::kFp8PerTensor, KvScheme::kFp8PerHead, KvScheme::kFp8E5m2,
                          KvScheme::kFp8PerHeadBf16Q}) {
    double err[2][std::size(kVariants)] = {};
    int i = 0;
    for (int len : {1024, 33000}) {
      test::ProblemSpec spec;
      spec.requests = decode_requests({len});
      spec.num_kv_heads = 2;
      spec.num_q_heads = 8;
      spec.head_dim = 128;
      spec.data.head_range = 10.0f;
      spec.data.outlier_channels = 4;
      spec.seed = 4242;
      const std::vector<DecodeErrors> es = run_case(*cpu, *gpu, spec, scheme);
      SCOPED_TRACE(std::string(scheme_name(scheme)) + " len=" + std::to_string(len));
      expect_close(es);
      for (size_t v = 0; v < es.size(); ++v) {
        const DecodeErrors& e = es[v];
        err[i][v] = e.gpu_emulated.normalized;
        std::printf(
            "[ info ] %s decode (%s) len %d: gpu vs exact %s; vs emulated %s; cpu vs emulated %s\n",
            scheme_name(scheme), kVariants[v].name, len, e.gpu_exact.str().c_str(),
            e.gpu_emulated.str().c_str(), e.cpu_emulated.str().c_str());
      }
      ++i;
    }
    for (size_t v = 0; v < std::size(kVariants); ++v) {
      EXPECT_LE(err[1][v], 1.5 * err[0][v] + 1e-4)
          << scheme_name(scheme) << " " << kVariants[v].name << ": kernel error grows with length";
    }
  }
}

// Split-KV on one backend (one workspace, reused and grown) across shapes and repeats: a few
// splits, many (one request over the whole GPU), none, and a larger batch of splits. Each run
// matches the CPU twin, and the second round is bit for bit the first (the split merge is
// deterministic). O starts as NaN every run, so nothing passes on an earlier run's output.
TEST(CudaDecode, SplitMergesRepeatAcrossShapes) {
  SKIP_WITHOUT_GPU();
  auto cpu = make_cpu_backend();
  auto gpu = make_cuda_backend();
  struct Case {
    const char* what;
    std::vector<int> lengths;
    int hkv;
  };
  const Case cases[] = {{"few splits", {2000, 1500, 900}, 2},
                        {"many splits", {8000}, 2},
                        {"no split", {300, 7, 1}, 2},
                        {"few splits, more groups", {1200, 1100, 1000, 999, 1300, 700, 1}, 4},
                        {"many splits, several requests", {16384, 9000, 2500, 300, 1}, 2}};
  for (KvScheme scheme : {KvScheme::kBf16, KvScheme::kFp8PerHead, KvScheme::kFp8PerTensor}) {
    std::vector<std::vector<uint16_t>> first;
    for (int round = 0; round < 2; ++round) {
      int i = 0;
      for (const Case& c : cases) {
        test::ProblemSpec spec;
        spec.requests = decode_requests(c.lengths);
        spec.num_kv_heads = c.hkv;
        spec.num_q_heads = 4 * c.hkv;
        spec.head_dim = 128;
        spec.data.outlier_channels = 2;
        spec.seed = 9000 + i;
        SCOPED_TRACE(std::string(scheme_name(scheme)) + " " + c.what + " round " +
                     std::to_string(round));
        const test::AttentionProblem prob = test::make_problem(spec);
        const test::KvScales scales = test::calibrate_scales(prob, scheme);
        test::RunOptions opt;
        opt.phase = AttentionPhase::kDecode;
        const test::AttentionRun g = test::run_attention(*gpu, prob, scheme, scales, opt);
        if (round == 0) {
          const test::AttentionRun c_run = test::run_attention(*cpu, prob, scheme, scales, opt);
          DecodeErrors e;
          const auto ref_em =
              test::reference_attention(prob, test::emulated_inputs(prob, scheme, scales), 0.0f);
          e.gpu_emulated = test::compare(g.o, ref_em, prob.head_dim);
          e.cpu_emulated = test::compare(c_run.o, ref_em, prob.head_dim);
          expect_close(e);
          first.push_back(g.o);
        } else {
          EXPECT_TRUE(g.o == first[i]) << "a repeated launch gave different bits";
        }
        ++i;
      }
    }
  }
}

// The split merge in the decode kernel counts each group's arrivals in the workspace and leaves the
// counters at zero. Here one launch of many splits over several requests (the shorter ones leave
// whole splits empty), on a workspace of the test's own, runs twice: after each launch every
// counter reads zero; between the two the partials' region is filled with NaN, and the second
// launch gives the first's bits (the merge reads only what this launch wrote, in a fixed order);
// both match the CPU twin. bf16 at head_dim 64 (two KV heads per CTA; Hkv 3 leaves the last CTA
// one), 128 and 256, GQA 12 (two head chunks, the second half full); with 3 KV heads the groups
// take at most kDecodeTwoLevelMergeAbove splits (one merge); with 1 KV head, GQA 8 and three
// requests (three CTAs unsplit: 43 splits on 132 SMs), more (sub-groups merged first, the last
// one short, their counters too).
TEST(CudaDecode, FusedSplitMergeLeavesItsCountersZero) {
  SKIP_WITHOUT_GPU();
  auto cpu = make_cpu_backend();
  auto gpu = make_cuda_backend();
  const size_t counter_bytes = cuda::kDecodeSplitCounters * sizeof(uint32_t);
  struct Shape {
    int hkv, D;
  };
  for (const Shape sh :
       {Shape{3, 64}, Shape{3, 128}, Shape{3, 256}, Shape{1, 64}, Shape{1, 128}, Shape{1, 256}}) {
    const int hkv = sh.hkv, D = sh.D;
    SCOPED_TRACE("Hkv=" + std::to_string(hkv) + " D=" + std::to_string(D));
    test::ProblemSpec spec;
    spec.requests =
        hkv == 1 ? decode_requests({16384, 9000, 1}) : decode_requests({16384, 9000, 2500, 300, 1});
    spec.num_kv_heads = hkv;
    spec.num_q_heads = hkv == 1 ? 8 : 12 * hkv;
    spec.head_dim = D;
    spec.data.outlier_channels = 2;
    spec.seed = 9100 + D + (hkv == 1 ? 7 : 0);
    const test::AttentionProblem prob = test::make_problem(spec);
    const KvScheme scheme = KvScheme::kBf16;
    const test::KvScales scales = test::calibrate_scales(prob, scheme);

    BackendBuffer pool(*gpu, prob.pool_elements() * sizeof(uint16_t)), kv(*gpu, prob.kv),
        kv_slot(*gpu, prob.kv_slot);
    const KvCacheLayer cache{pool.as<void>(), prob.num_slots, prob.num_kv_heads, prob.head_dim,
                             scheme};
    QuantizeKvParams qkv;
    qkv.kv = kv.as<uint16_t>();
    qkv.slots = kv_slot.as<int32_t>();
    qkv.num_tokens = prob.num_tokens();
    qkv.cache = cache;
    gpu->quantize_kv(qkv);
    BackendBuffer q(*gpu, prob.q), o(*gpu, prob.q.size() * sizeof(uint16_t));
    const DeviceBatch db(*gpu, prob);
    AttentionParams p;
    p.q = q.as<uint16_t>();
    p.o = o.as<uint16_t>();
    p.num_q_heads = prob.num_q_heads;
    p.cache = cache;
    p.batch = db.batch(prob);
    gpu->synchronize();

    const int splits = cuda::DecodeLaunchKey::unpack(cuda::decode_launch_key(p)).num_splits;
    ASSERT_GE(splits, 4) << "the case must split the KV length several times";
    if (hkv == 1) {
      ASSERT_GT(splits, cuda::kDecodeTwoLevelMergeAbove) << "the case must merge in two levels";
    } else {
      ASSERT_LE(splits, cuda::kDecodeTwoLevelMergeAbove) << "the case must merge in one";
    }
    const size_t ws_bytes = cuda::decode_workspace_bytes(p);
    ASSERT_GT(ws_bytes, counter_bytes);
    BackendBuffer ws(*gpu, ws_bytes);
    cuda::clear_decode_workspace(ws.get(), ws_bytes, nullptr);

    test::RunOptions opt;
    opt.phase = AttentionPhase::kDecode;
    const test::AttentionRun c = test::run_attention(*cpu, prob, scheme, scales, opt);
    const auto ref_em =
        test::reference_attention(prob, test::emulated_inputs(prob, scheme, scales), 0.0f);
    std::vector<uint16_t> first;
    for (int run = 0; run < 2; ++run) {
      SCOPED_TRACE("run " + std::to_string(run));
      cuda::check_cuda(cudaMemset(o.get(), 0xff, o.bytes()), "O = NaN");
      if (run == 1) {
        cuda::check_cuda(cudaMemset(static_cast<uint8_t*>(ws.get()) + counter_bytes, 0xff,
                                    ws_bytes - counter_bytes),
                         "partials = NaN");
      }
      cuda::launch_decode_attention(p, ws.get(), nullptr);
      cuda::check_cuda(cudaDeviceSynchronize(), "decode_attention");
      std::vector<uint32_t> counters(counter_bytes / sizeof(uint32_t));
      cuda::check_cuda(cudaMemcpy(counters.data(), ws.get(), counter_bytes, cudaMemcpyDeviceToHost),
                       "counters");
      const auto nonzero =
          std::find_if(counters.begin(), counters.end(), [](uint32_t x) { return x != 0; });
      EXPECT_EQ(nonzero, counters.end())
          << "counter " << (nonzero - counters.begin()) << " = " << *nonzero;
      const std::vector<uint16_t> out = o.download<uint16_t>();
      if (run == 0) {
        DecodeErrors e;
        e.gpu_emulated = test::compare(out, ref_em, prob.head_dim);
        e.cpu_emulated = test::compare(c.o, ref_em, prob.head_dim);
        expect_close(e);
        first = out;
      } else {
        EXPECT_TRUE(out == first) << "the second launch gave different bits";
      }
    }
  }
}

// The cluster tests' batch: `batch` requests of up to 2000 keys, every fourth from the second one
// key and every fourth from the third 700 (later splits without a key), outliers in two channels.
test::AttentionProblem cluster_batch(int batch, int hkv, int hq, int head_dim, uint64_t seed) {
  std::vector<int> lengths;
  for (int i = 0; i < batch; ++i) {
    lengths.push_back(i % 4 == 1 ? 1 : i % 4 == 2 ? 700 : 2000 - 13 * i);
  }
  test::ProblemSpec spec;
  spec.requests = decode_requests(lengths);
  spec.num_kv_heads = hkv;
  spec.num_q_heads = hq;
  spec.head_dim = head_dim;
  spec.data.outlier_channels = 2;
  spec.seed = seed;
  return test::make_problem(spec);
}

// Split launches of 2 to kDecodeClusterMergeMaxSplits splits that fit one wave merge each group's
// splits in a thread block cluster, in shared memory (merge_group_in_cluster: each CTA merges a
// run of the group's rows from every CTA's partials). Batches of 16, 24 and 48 requests of up to
// 2000 keys give 4, 2 and 4 splits at two KV heads a CTA (8, 5 and 2 at FP8 head_dim 64's four;
// 2, 3 and 4 at bf16 head_dim 256's one; decode_split.h plans by CTAs per SM): the cases whose
// launch takes the cluster path (decode_launch_key) run, and every shape and scheme has one. GQA 7
// on 3 KV heads (a CTA of two heads whose second is past the last; 7 of the 8 query-head rows),
// group 12 (two head chunks, the second of 4 rows), head_dim 64, 128 and 256; requests of 1 and 700
// keys among them leave later splits without a key. Each matches the CPU twin, and a second launch
// gives the first's bits.
TEST(CudaDecode, ClusterSplitMergeMatchesTheTwin) {
  SKIP_WITHOUT_GPU();
  auto cpu = make_cpu_backend();
  auto gpu = make_cuda_backend();
  struct Shape {
    int hkv, hq, D;
  };
  uint64_t seed = 9300;
  for (const Shape sh :
       {Shape{3, 21, 128}, Shape{2, 24, 128}, Shape{3, 21, 64}, Shape{3, 21, 256}}) {
    for (KvScheme scheme : {KvScheme::kBf16, KvScheme::kFp8PerHead, KvScheme::kFp8PerTensor}) {
      int clustered = 0;
      for (int batch : {16, 24, 48}) {
        const test::AttentionProblem prob = cluster_batch(batch, sh.hkv, sh.hq, sh.D, ++seed);
        const cuda::DecodeLaunchKey ls = launch_key(prob, scheme);
        if (!ls.cluster_merge) continue;
        ++clustered;
        SCOPED_TRACE(std::string(scheme_name(scheme)) + " Hkv=" + std::to_string(sh.hkv) +
                     " Hq=" + std::to_string(sh.hq) + " D=" + std::to_string(sh.D) + " batch " +
                     std::to_string(batch) + ", " + std::to_string(ls.num_splits) + " splits");
        EXPECT_GE(ls.num_splits, 2);
        EXPECT_LE(ls.num_splits, cuda::kDecodeClusterMergeMaxSplits);
        expect_close(run_case(*cpu, *gpu, prob, scheme));
        run_twice_same_bits(*gpu, prob, scheme, test::calibrate_scales(prob, scheme));
      }
      EXPECT_GE(clustered, 1) << scheme_name(scheme) << " Hkv=" << sh.hkv << " D=" << sh.D
                              << ": no batch took the cluster merge";
    }
  }
}

// A one-wave launch of one CTA an SM over 4096 keys or more (decode_split.h,
// double_one_wave_split), FP8 at head_dim 128 (two KV heads a CTA, two CTAs an SM) on 8 KV heads,
// scattered slots: as many requests as fill the SMs once unsplit (the longest 4100 keys, the others
// 1 to 4100, a one-key request among them), and four requests of 8200, 1, 5000 and 3000 keys, which
// the plan splits to fill the SMs once. Without the caller's word that its slots lie in pages, the
// first launch splits in two (cluster pairs) and the second takes more splits than with the word
// (the counter merge); with it, both keep the plan. Each matches the CPU twin and repeats its bits;
// bf16 (its SM may hold one CTA) matches the twin whatever its plan.
TEST(CudaDecode, TwiceTheSplitsOfALongOneWaveLaunchMatchTheTwin) {
  SKIP_WITHOUT_GPU();
  auto cpu = make_cpu_backend();
  auto gpu = make_cuda_backend();
  const int requests = std::max(1, cuda::device_sm_count() / 4);  // four CTAs a request
  std::vector<int> one_wave;
  for (int b = 0; b < requests; ++b)
    one_wave.push_back(b == 0 ? 4100 : b == 1 ? 1 : 1 + (b * 977) % 4100);
  uint64_t seed = 9500;
  for (const std::vector<int>& lengths : {one_wave, std::vector<int>{8200, 1, 5000, 3000}}) {
    test::ProblemSpec spec;
    spec.requests = decode_requests(lengths);
    spec.num_kv_heads = 8;
    spec.num_q_heads = 32;
    spec.head_dim = 128;
    spec.data.outlier_channels = 2;
    spec.seed = ++seed;
    const test::AttentionProblem prob = test::make_problem(spec);
    for (KvScheme scheme : {KvScheme::kFp8PerHead, KvScheme::kFp8PerTensor, KvScheme::kBf16}) {
      const cuda::DecodeLaunchKey paged = launch_key(prob, scheme, false, true);
      const cuda::DecodeLaunchKey plain = launch_key(prob, scheme, false, false);
      EXPECT_TRUE(plain.gather_rows);  // one wave, split or not
      if (scheme != KvScheme::kBf16 && lengths.size() > 4) {
        EXPECT_EQ(paged.num_splits, 1);
        EXPECT_EQ(plain.num_splits, 2);
        EXPECT_TRUE(plain.cluster_merge);
      } else if (scheme != KvScheme::kBf16) {
        EXPECT_GE(paged.num_splits, 2);
        EXPECT_GT(plain.num_splits, paged.num_splits);
      }
      for (bool pages : {false, true}) {
        SCOPED_TRACE(std::string(scheme_name(scheme)) + " " + std::to_string(lengths.size()) +
                     " requests, " + (pages ? "slots in pages" : "no word") + ", " +
                     std::to_string((pages ? paged : plain).num_splits) + " splits");
        const test::KvScales scales = test::calibrate_scales(prob, scheme);
        test::RunOptions opt;
        opt.phase = AttentionPhase::kDecode;
        opt.slots_in_pages = pages;
        const test::AttentionRun c = test::run_attention(*cpu, prob, scheme, scales, opt);
        const test::AttentionRun g = test::run_attention(*gpu, prob, scheme, scales, opt);
        const auto ref_em =
            test::reference_attention(prob, test::emulated_inputs(prob, scheme, scales));
        DecodeErrors e;
        e.gpu_emulated = test::compare(g.o, ref_em, prob.head_dim);
        e.cpu_emulated = test::compare(c.o, ref_em, prob.head_dim);
        expect_close(e);
        const test::AttentionRun again = test::run_attention(*gpu, prob, scheme, scales, opt);
        EXPECT_TRUE(again.o == g.o) << "a repeated launch gave different bits";
      }
    }
  }
}

// One launch of the cluster merge, small enough for compute-sanitizer's memcheck and racecheck
// (scripts/gpu-check's sanitizer list): the first of the batches above whose launch takes it, at
// GQA 7 on 3 KV heads, fp8-per-head, head_dim 128.
TEST(CudaDecode, ClusterSplitMergeOnceForTheSanitizers) {
  SKIP_WITHOUT_GPU();
  auto cpu = make_cpu_backend();
  auto gpu = make_cuda_backend();
  const KvScheme scheme = KvScheme::kFp8PerHead;
  bool ran = false;
  for (int batch : {16, 24, 48}) {
    const test::AttentionProblem prob = cluster_batch(batch, 3, 21, 128, 9400 + batch);
    if (!launch_key(prob, scheme).cluster_merge) continue;
    SCOPED_TRACE("batch " + std::to_string(batch));
    expect_close(run_case(*cpu, *gpu, prob, scheme));
    ran = true;
    break;
  }
  EXPECT_TRUE(ran) << "no batch took the cluster merge";
}

// The counter merge's two final merges, in launches small enough for compute-sanitizer's memcheck
// and racecheck (scripts/gpu-check's sanitizer list): fp8-per-head, one request of 9000 keys and
// one of 3 (its later splits without a key), GQA 3 on 3 KV heads, two KV heads a CTA (the last
// CTA's second head past the last). Head_dim 128 merges every group in registers
// (merge_column_direct: 6 rows of 32 float4 columns on 8 warps, 3 rows in the last CTA); at 256
// the first CTA's groups go through shared memory (merge_group_splits' two phases: 6 rows of 64
// columns, more than a column a thread), the last CTA's in registers (3 rows, 6 of its 8 warps).
TEST(CudaDecode, CounterSplitMergeOnceForTheSanitizers) {
  SKIP_WITHOUT_GPU();
  auto cpu = make_cpu_backend();
  auto gpu = make_cuda_backend();
  const KvScheme scheme = KvScheme::kFp8PerHead;
  for (int head_dim : {128, 256}) {
    test::ProblemSpec spec;
    spec.requests = decode_requests({9000, 3});
    spec.num_kv_heads = 3;
    spec.num_q_heads = 9;
    spec.head_dim = head_dim;
    spec.data.outlier_channels = 2;
    spec.seed = 9700 + head_dim;
    const test::AttentionProblem prob = test::make_problem(spec);
    const cuda::DecodeLaunchKey key = launch_key(prob, scheme);
    SCOPED_TRACE("head_dim " + std::to_string(head_dim) + ", " + std::to_string(key.num_splits) +
                 " splits");
    ASSERT_GT(key.num_splits, 1) << "the case must split";
    ASSERT_LE(key.num_splits, cuda::kDecodeTwoLevelMergeAbove) << "the case must merge in one";
    ASSERT_FALSE(key.cluster_merge) << "the case must take the counter merge";
    expect_close(run_case(*cpu, *gpu, prob, scheme));
  }
}

TEST(CudaDecode, RefusesBadArguments) {
  SKIP_WITHOUT_GPU();
  auto gpu = make_cuda_backend();
  test::ProblemSpec spec;
  spec.requests = decode_requests({5, 9});
  const test::AttentionProblem prob = test::make_problem(spec);
  BackendBuffer pool(*gpu, prob.pool_elements() * 2), q(*gpu, prob.q);
  const std::vector<uint16_t> poison(prob.q.size(), 0x7fc1);
  BackendBuffer o(*gpu, poison);
  const DeviceBatch db(*gpu, prob);
  AttentionParams p;
  p.q = q.as<uint16_t>();
  p.o = o.as<uint16_t>();
  p.num_q_heads = prob.num_q_heads;
  p.cache = {pool.as<void>(), prob.num_slots, prob.num_kv_heads, prob.head_dim, KvScheme::kBf16};
  p.batch = db.batch(prob);
  {
    AttentionParams bad = p;
    bad.batch.num_requests = 0;
    EXPECT_THROW(gpu->decode_attention(bad), Error);  // empty batch
  }
  {
    AttentionParams bad = p;
    bad.cache.head_dim = 96;
    try {
      gpu->decode_attention(bad);
      ADD_FAILURE() << "head_dim 96 accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("96"), std::string::npos) << e.what();
    }
  }
  {
    AttentionParams bad = p;
    bad.num_q_heads = prob.num_kv_heads * 2 + 1;
    EXPECT_THROW(gpu->decode_attention(bad), Error);  // Hq not a multiple of Hkv
  }
  {
    AttentionParams bad = p;
    bad.cache.scheme = KvScheme::kFp8PerHead;  // no q_fp8 / scales
    EXPECT_THROW(gpu->decode_attention(bad), Error);
  }
  for (uint16_t x : o.download<uint16_t>()) ASSERT_EQ(x, 0x7fc1);  // nothing written
}

// b_req_idx lives in device memory: the kernels skip a request outside req_to_token's rows (reading
// nothing of it) and record it; the backend's next synchronize() throws, once; then work goes on.
TEST(CudaDecode, RequestOutOfRangeIsSkippedAndReportedAtSynchronize) {
  SKIP_WITHOUT_GPU();
  auto gpu = make_cuda_backend();
  test::ProblemSpec spec;
  spec.requests = decode_requests({5, 9});
  const test::AttentionProblem prob = test::make_problem(spec);
  const OnesPool ones(*gpu, prob);
  const int rows = ones.rows;
  const BackendBuffer& o = ones.o;
  for (const int32_t bad_row : {rows, -1, 1 << 30}) {
    std::vector<int32_t> bad_index = prob.req_index;
    bad_index[1] = bad_row;
    BackendBuffer bad_ri(*gpu, bad_index);
    const AttentionParams p = ones.params(bad_ri.as<int32_t>());
    ASSERT_EQ(p.batch.max_requests, rows);
    for (const bool decode : {true, false}) {
      if (decode) {
        gpu->decode_attention(p);  // queued: no host sync, no throw here
      } else {
        gpu->prefill_attention(p);
      }
      const std::string want = std::string(decode ? "decode_attention" : "prefill_attention") +
                               ": b_req_idx[1] = " + std::to_string(bad_row) +
                               " out of [0, max_requests " + std::to_string(rows) + ")";
      expect_refusal_at_synchronize(*gpu, want);
      gpu->synchronize();  // reported once
      // Request 0 was computed: a pool of ones gives V = 1 everywhere, so every output is 1.
      const std::vector<uint16_t> out = o.download<uint16_t>();
      const size_t row = static_cast<size_t>(prob.num_q_heads) * prob.head_dim;
      for (size_t i = 0; i < row; ++i) ASSERT_EQ(out[i], 0x3f80) << "request 0, element " << i;
    }
  }
  // A good batch afterwards runs and synchronizes cleanly.
  gpu->decode_attention(ones.params());
  EXPECT_NO_THROW(gpu->synchronize());
}

// The same in a persistent launch (600 requests: two waves and more of items): the refused
// request's rows stay as they were (NaN), every other request is computed (a pool of ones: 1.0
// everywhere), the error comes once at synchronize, and the next launch (its counters back at
// zero) computes every request.
TEST(CudaDecode, PersistentLaunchSkipsARefusedRequest) {
  SKIP_WITHOUT_GPU();
  auto gpu = make_cuda_backend();
  test::ProblemSpec spec;
  std::vector<int> lengths;
  for (int b = 0; b < 600; ++b) lengths.push_back(1 + (b * 37) % 200);
  spec.requests = decode_requests(lengths);
  const test::AttentionProblem prob = test::make_problem(spec);
  ASSERT_TRUE(takes_persistent(prob, KvScheme::kBf16));
  const OnesPool ones(*gpu, prob);
  const BackendBuffer& o = ones.o;
  std::vector<int32_t> bad_index = prob.req_index;
  const int bad = 7;
  bad_index[bad] = ones.rows;
  BackendBuffer bad_ri(*gpu, bad_index);
  AttentionParams p = ones.params(bad_ri.as<int32_t>());
  const size_t row = static_cast<size_t>(prob.num_q_heads) * prob.head_dim;
  for (const bool refuse : {true, false}) {
    SCOPED_TRACE(refuse ? "a refused request" : "every request good");
    if (!refuse) p = ones.params();
    gpu->memset(o.as<void>(), 0xff, o.bytes());
    gpu->decode_attention(p);
    if (refuse) expect_refusal_at_synchronize(*gpu, "b_req_idx[" + std::to_string(bad) + "]");
    EXPECT_NO_THROW(gpu->synchronize());
    const std::vector<uint16_t> out = o.download<uint16_t>();
    for (size_t b = 0; b < lengths.size(); ++b) {
      const uint16_t want = refuse && b == static_cast<size_t>(bad) ? 0xffff : 0x3f80;
      for (size_t i = 0; i < row; ++i)
        ASSERT_EQ(out[b * row + i], want) << "request " << b << ", element " << i;
    }
  }
}

}  // namespace
}  // namespace fp8kv
