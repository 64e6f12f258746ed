// Test helpers for the attention kernels, shared by the CPU tests (tests/kernels) and the GPU
// tests (tests/cuda): random batches with outliers, calibration of scales, a float64 reference
// attention, error metrics, and a runner that pushes a batch through any Backend.
//
// Header-only. Typical use:
//   test::ProblemSpec spec;
//   spec.requests = {{/*cached*/ 100, /*fresh*/ 7}, {0, 127}, {299, 1}};
//   spec.data.head_range = 100.0f;  spec.data.outlier_channels = 4;
//   test::AttentionProblem problem = test::make_problem(spec);
//   test::KvScales scales = test::calibrate_scales(problem, KvScheme::kFp8PerHead);
//   auto cpu = make_cpu_backend();
//   test::AttentionRun run = test::run_attention(*cpu, problem, KvScheme::kFp8PerHead, scales);
//   auto ref = test::reference_attention(problem, test::exact_inputs(problem));
//   test::ErrorStats err = test::compare(run.o, ref, problem.head_dim);
//
// Error metrics (STYLE.md): normalized error ||o - ref|| / ||ref|| over the whole output, and
// the largest per-row normalized error, a row being one (token, query head) of D values.
// Non-finite outputs are counted and make every metric infinite; they are never skipped.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "fp8kv/backend.h"
#include "fp8kv/buffer.h"
#include "fp8kv/error.h"
#include "fp8kv/fp8.h"
#include "fp8kv/scheme.h"
#include "kernels/validate.h"

namespace fp8kv::test {

// ---- random numbers ------------------------------------------------------------------------

// Deterministic for a seed (with one standard library).
class Rng {
 public:
  explicit Rng(uint64_t seed) : engine_(seed) {}
  float normal() { return normal_(engine_); }
  float uniform(float lo, float hi) {
    return std::uniform_real_distribution<float>(lo, hi)(engine_);
  }
  int uniform_int(int lo, int hi) {
    return std::uniform_int_distribution<int>(lo, hi)(engine_);
  }  // [lo, hi]
  std::mt19937_64& engine() { return engine_; }

 private:
  std::mt19937_64 engine_;
  std::normal_distribution<float> normal_{0.0f, 1.0f};
};

// ---- problems ------------------------------------------------------------------------------

// How the values are drawn: standard normal times a gain per (KV head, channel).
struct DataProfile {
  // KV head g gets gain head_range^(g / (Hkv - 1)) on K and V: heads differ in range by up to
  // this ratio (what per-head scales are for).
  float head_range = 1.0f;
  // Per KV head, this many K channels get an extra gain drawn from [outlier_gain_min, max]
  // (the outlier channels of real K caches).
  int outlier_channels = 0;
  float outlier_gain_min = 20.0f;
  float outlier_gain_max = 50.0f;
  // Q of group g is scaled so that the logits q.k * (1/sqrt(D)) have this standard deviation,
  // whatever the K gains: attention stays neither uniform nor one-hot.
  float logit_std = 2.0f;
};

// One request: seq_len = cached + fresh tokens, q_len = fresh.
struct RequestShape {
  int cached = 0;
  int fresh = 1;
};

struct ProblemSpec {
  std::vector<RequestShape> requests;
  int num_q_heads = 8;
  int num_kv_heads = 2;
  int head_dim = 128;
  DataProfile data;
  uint64_t seed = 1;
  int spare_slots = 5;  // pool slots nobody uses (the runner fills them with NaN)
};

// A batch on the host. K/V are kept per token (request-major, position order) with the slot
// each token lives in; the reference reads them by position, the kernels through the slots.
struct AttentionProblem {
  int num_q_heads = 0;                // Hq
  int num_kv_heads = 0;               // Hkv
  int head_dim = 0;                   // D
  std::vector<int32_t> seq_len;       // [B] cached + new tokens
  std::vector<int32_t> cu_seqlens_q;  // [B + 1]
  std::vector<int32_t> req_index;     // [B] row of req_to_token (shuffled)
  std::vector<int32_t> req_to_token;  // [B + 1, max_len]; unused entries hold the padding slot
  int max_len = 0;
  int64_t num_slots = 0;          // usable pool slots; slot num_slots is the padding slot
  std::vector<uint16_t> q;        // [total_q, Hq, D] bf16
  std::vector<uint16_t> kv;       // [num_tokens, 2 * Hkv, D] bf16, every token of every request
  std::vector<int32_t> kv_slot;   // [num_tokens] slot of each token (shuffled)
  std::vector<int64_t> kv_begin;  // [B + 1] first token of request b in kv

  int num_requests() const { return static_cast<int>(seq_len.size()); }
  int64_t total_q() const { return cu_seqlens_q.back(); }
  int64_t num_tokens() const { return kv_begin.back(); }
  int q_len(int b) const { return cu_seqlens_q[b + 1] - cu_seqlens_q[b]; }
  int max_q_len() const {
    int m = 0;
    for (int b = 0; b < num_requests(); ++b) m = std::max(m, q_len(b));
    return m;
  }
  int max_seq_len() const { return *std::max_element(seq_len.begin(), seq_len.end()); }
  int64_t pool_elements() const { return (num_slots + 1) * 2 * num_kv_heads * head_dim; }
  // The batch with the given array pointers (host or device copies of the vectors above).
  AttentionBatch batch(const int32_t* seq_len_ptr, const int32_t* cu_seqlens_ptr,
                       const int32_t* req_index_ptr, const int32_t* req_to_token_ptr) const {
    AttentionBatch b;
    b.num_requests = num_requests();
    b.seq_len = seq_len_ptr;
    b.cu_seqlens_q = cu_seqlens_ptr;
    b.req_index = req_index_ptr;
    b.req_to_token = req_to_token_ptr;
    b.max_requests = static_cast<int>(req_to_token.size() / max_len);
    b.max_len = max_len;
    b.total_q = total_q();
    b.max_q_len = max_q_len();
    b.max_seq_len = max_seq_len();
    return b;
  }
  AttentionBatch host_batch() const {
    return batch(seq_len.data(), cu_seqlens_q.data(), req_index.data(), req_to_token.data());
  }
};

inline AttentionProblem make_problem(const ProblemSpec& spec) {
  if (spec.requests.empty()) throw Error("make_problem: no requests");
  Rng rng(spec.seed);
  AttentionProblem p;
  p.num_q_heads = spec.num_q_heads;
  p.num_kv_heads = spec.num_kv_heads;
  p.head_dim = spec.head_dim;
  const int B = static_cast<int>(spec.requests.size());
  const int Hq = spec.num_q_heads, Hkv = spec.num_kv_heads, D = spec.head_dim;
  const int group = Hq / Hkv;

  p.cu_seqlens_q.assign(1, 0);
  p.kv_begin.assign(1, 0);
  for (const RequestShape& r : spec.requests) {
    p.seq_len.push_back(r.cached + r.fresh);
    p.cu_seqlens_q.push_back(p.cu_seqlens_q.back() + r.fresh);
    p.kv_begin.push_back(p.kv_begin.back() + r.cached + r.fresh);
  }
  p.max_len = p.max_seq_len() + 3;
  p.num_slots = p.num_tokens() + spec.spare_slots;

  // Slots: a random permutation, so neighbours in a request are scattered in the pool.
  std::vector<int32_t> all_slots(p.num_slots);
  std::iota(all_slots.begin(), all_slots.end(), 0);
  std::shuffle(all_slots.begin(), all_slots.end(), rng.engine());
  p.kv_slot.assign(all_slots.begin(), all_slots.begin() + p.num_tokens());
  // Request rows: a permutation of B + 1 rows (one row unused).
  std::vector<int32_t> rows(B + 1);
  std::iota(rows.begin(), rows.end(), 0);
  std::shuffle(rows.begin(), rows.end(), rng.engine());
  p.req_index.assign(rows.begin(), rows.begin() + B);
  p.req_to_token.assign(static_cast<size_t>(B + 1) * p.max_len, static_cast<int32_t>(p.num_slots));
  for (int b = 0; b < B; ++b) {
    for (int pos = 0; pos < p.seq_len[b]; ++pos) {
      p.req_to_token[static_cast<size_t>(p.req_index[b]) * p.max_len + pos] =
          p.kv_slot[p.kv_begin[b] + pos];
    }
  }

  // Gains: head_gain[g] on K and V, k_gain[g][d] with outliers, q_gain[g] for the logit std.
  const DataProfile& data = spec.data;
  std::vector<float> head_gain(Hkv, 1.0f), q_gain(Hkv);
  std::vector<float> k_gain(static_cast<size_t>(Hkv) * D);
  for (int g = 0; g < Hkv; ++g) {
    if (Hkv > 1) head_gain[g] = std::pow(data.head_range, static_cast<float>(g) / (Hkv - 1));
    float* kg = &k_gain[static_cast<size_t>(g) * D];
    std::fill(kg, kg + D, head_gain[g]);
    std::vector<int> channels(D);
    std::iota(channels.begin(), channels.end(), 0);
    std::shuffle(channels.begin(), channels.end(), rng.engine());
    for (int i = 0; i < std::min(data.outlier_channels, D); ++i) {
      kg[channels[i]] *= rng.uniform(data.outlier_gain_min, data.outlier_gain_max);
    }
    double mean_sq = 0.0;
    for (int d = 0; d < D; ++d) mean_sq += static_cast<double>(kg[d]) * kg[d];
    mean_sq /= D;
    q_gain[g] = static_cast<float>(data.logit_std / std::sqrt(mean_sq));
  }

  // The values: each token's K/V row and each new token's Q row from a generator of its own,
  // seeded by the token's index and a base drawn above, so that the tokens are drawn in parallel
  // and the data does not depend on the thread count. (One sequential stream for every value made
  // a 300-request problem cost ~7 s of one core: most of the long GPU tests' time.)
  const uint64_t kv_seed = rng.engine()(), q_seed = rng.engine()();
  p.kv.resize(static_cast<size_t>(p.num_tokens()) * 2 * Hkv * D);
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < p.num_tokens(); ++t) {
    Rng token_rng(kv_seed + static_cast<uint64_t>(t));
    for (int head = 0; head < 2 * Hkv; ++head) {
      const int g = head % Hkv;
      const bool is_k = head < Hkv;
      uint16_t* row = &p.kv[(t * 2 * Hkv + head) * D];
      for (int d = 0; d < D; ++d) {
        const float gain = is_k ? k_gain[static_cast<size_t>(g) * D + d] : head_gain[g];
        row[d] = float_to_bf16(token_rng.normal() * gain);
      }
    }
  }
  p.q.resize(static_cast<size_t>(p.total_q()) * Hq * D);
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < p.total_q(); ++t) {
    Rng token_rng(q_seed + static_cast<uint64_t>(t));
    for (int h = 0; h < Hq; ++h) {
      for (int d = 0; d < D; ++d) {
        p.q[(t * Hq + h) * D + d] = float_to_bf16(token_rng.normal() * q_gain[h / group]);
      }
    }
  }
  return p;
}

// The same problem (the same tokens, K/V, Q and request rows) with each request's tokens in
// consecutive slots, as a pool that hands out runs stores them (requests in the order of their
// rows, 3 free slots between them); in every request whose index is a multiple of `break_every`
// (0: none), the slots of positions 130 and 131 swapped, so that one warp's rows of its third
// 64-key tile (and its second 128-key tile) are not consecutive while the others are.
inline AttentionProblem with_consecutive_slots(const AttentionProblem& p, int break_every = 0) {
  AttentionProblem c = p;
  const int B = p.num_requests();
  std::vector<int> by_row(B);
  std::iota(by_row.begin(), by_row.end(), 0);
  std::sort(by_row.begin(), by_row.end(),
            [&](int x, int y) { return p.req_index[x] < p.req_index[y]; });
  int64_t slots = 0;
  for (int b = 0; b < B; ++b) slots += p.seq_len[b] + 3;
  c.num_slots = std::max<int64_t>(slots, p.num_slots);
  // Unused entries of req_to_token hold the padding slot (num_slots).
  std::fill(c.req_to_token.begin(), c.req_to_token.end(), static_cast<int32_t>(c.num_slots));
  int64_t next = 0;
  for (int b : by_row) {
    for (int pos = 0; pos < p.seq_len[b]; ++pos) {
      c.kv_slot[p.kv_begin[b] + pos] = static_cast<int32_t>(next + pos);
    }
    if (break_every > 0 && b % break_every == 0 && p.seq_len[b] > 131) {
      std::swap(c.kv_slot[p.kv_begin[b] + 130], c.kv_slot[p.kv_begin[b] + 131]);
    }
    for (int pos = 0; pos < p.seq_len[b]; ++pos) {
      c.req_to_token[static_cast<size_t>(p.req_index[b]) * p.max_len + pos] =
          c.kv_slot[p.kv_begin[b] + pos];
    }
    next += p.seq_len[b] + 3;
  }
  return c;
}

// One request of seq_len keys (the last q_len of them new), one KV head and one query head, with
// an attention sink: key 0's logit is 8 nats above the others' (N(0, 0.3): q along channel 0,
// logit = k[0]), V -4 on the sink and 1 + N(0, 0.1) elsewhere. The tail's p ~ e^-8 each (below
// 2^-10) carry most of the row's mass: the pattern where rounding P to e4m3 must keep small values.
inline AttentionProblem make_sink_problem(int seq_len, int q_len, int head_dim, uint64_t seed) {
  ProblemSpec spec;
  spec.requests = {{seq_len - q_len, q_len}};
  spec.num_q_heads = 1;
  spec.num_kv_heads = 1;
  spec.head_dim = head_dim;
  spec.seed = seed;
  AttentionProblem p = make_problem(spec);
  Rng rng(seed + 1);
  const float q0 = std::sqrt(static_cast<float>(head_dim));  // logit = q . k / sqrt(D) = k[0]
  for (size_t i = 0; i < p.q.size(); ++i) p.q[i] = float_to_bf16(i % head_dim == 0 ? q0 : 0.0f);
  for (int64_t t = 0; t < p.num_tokens(); ++t) {
    uint16_t* k = &p.kv[static_cast<size_t>(t) * 2 * head_dim];
    uint16_t* v = k + head_dim;
    for (int d = 0; d < head_dim; ++d) {
      k[d] = float_to_bf16(d == 0 ? (t == 0 ? 8.0f : 0.3f * rng.normal()) : rng.normal());
      v[d] = float_to_bf16(t == 0 ? -4.0f : 1.0f + 0.1f * rng.normal());
    }
  }
  return p;
}

// ---- scales --------------------------------------------------------------------------------

// K/V scales of one layer as the kernels take them: per-head [Hkv], per-tensor [1], empty for the
// schemes without scales (bf16, fp8-e5m2).
struct KvScales {
  std::vector<float> k, v;
};

// Offline calibration on the problem's own K/V: scale = amax / 448, 0 -> 1.
inline KvScales calibrate_scales(const AttentionProblem& p, KvScheme scheme) {
  KvScales s;
  if (!has_kv_scales(scheme)) return s;
  const int Hkv = p.num_kv_heads, D = p.head_dim;
  std::vector<float> amax(2 * Hkv, 0.0f);  // K heads then V heads
  for (int64_t t = 0; t < p.num_tokens(); ++t) {
    for (int head = 0; head < 2 * Hkv; ++head) {
      for (int d = 0; d < D; ++d) {
        amax[head] =
            std::max(amax[head], std::fabs(bf16_to_float(p.kv[(t * 2 * Hkv + head) * D + d])));
      }
    }
  }
  auto to_scale = [](float a) { return a == 0.0f ? 1.0f : a / kE4m3Max; };
  if (kv_scale_source(scheme) == KvScaleSource::kPerHead) {
    for (int g = 0; g < Hkv; ++g) {
      s.k.push_back(to_scale(amax[g]));
      s.v.push_back(to_scale(amax[Hkv + g]));
    }
  } else {
    s.k.push_back(to_scale(*std::max_element(amax.begin(), amax.begin() + Hkv)));
    s.v.push_back(to_scale(*std::max_element(amax.begin() + Hkv, amax.end())));
  }
  return s;
}

// The dynamic Q scale of fp8-per-head, as quantize_q computes it: [B, Hkv].
inline std::vector<float> dynamic_q_scales(const AttentionProblem& p) {
  const int B = p.num_requests(), Hq = p.num_q_heads, Hkv = p.num_kv_heads, D = p.head_dim;
  const int group = Hq / Hkv;
  std::vector<float> scales(static_cast<size_t>(B) * Hkv);
  for (int b = 0; b < B; ++b) {
    for (int g = 0; g < Hkv; ++g) {
      float amax = 0.0f;
      for (int64_t t = p.cu_seqlens_q[b]; t < p.cu_seqlens_q[b + 1]; ++t) {
        for (int h = g * group; h < (g + 1) * group; ++h) {
          for (int d = 0; d < D; ++d) {
            amax = std::max(amax, std::fabs(bf16_to_float(p.q[(t * Hq + h) * D + d])));
          }
        }
      }
      scales[static_cast<size_t>(b) * Hkv + g] = amax == 0.0f ? 1.0f : amax / kE4m3Max;
    }
  }
  return scales;
}

// ---- float64 reference ---------------------------------------------------------------------

// The values attention is computed on, in float64, shaped like problem.q and problem.kv.
struct ReferenceInputs {
  std::vector<double> q;   // [total_q, Hq, D]
  std::vector<double> kv;  // [num_tokens, 2 * Hkv, D]
};

// bf16 codes as doubles, element-wise in parallel (the same values on any number of threads).
inline std::vector<double> bf16_values(const std::vector<uint16_t>& x) {
  std::vector<double> out(x.size());
  const int64_t n = static_cast<int64_t>(x.size());
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_float(x[i]);
  return out;
}

// The bf16 inputs exactly: the reference the kernels are judged against.
inline ReferenceInputs exact_inputs(const AttentionProblem& p) {
  return {bf16_values(p.q), bf16_values(p.kv)};
}

// The inputs after the scheme's FP8 rounding, as the kernels see them: K/V through
// quantize_e4m3 with the scales (quantize_e5m2 with scale 1 for fp8-e5m2), Q (fp8-per-head only)
// with the dynamic per-(request, KV head) scale, or static_q_scale [Hkv] when given. P is not
// rounded here. Attention on these in float64 separates the error of the input quantization
// from the kernel's own.
inline ReferenceInputs emulated_inputs(const AttentionProblem& p, KvScheme scheme,
                                       const KvScales& scales,
                                       const std::vector<float>& static_q_scale = {}) {
  if (!is_fp8(scheme)) return exact_inputs(p);
  ReferenceInputs in{bf16_values(p.q), std::vector<double>(p.kv.size())};
  const int Hq = p.num_q_heads, Hkv = p.num_kv_heads, D = p.head_dim;
  auto round_trip = [](float x, float scale) {
    return static_cast<double>(e4m3_to_float(quantize_e4m3(x, scale))) * scale;
  };
  const KvScaleSource source = kv_scale_source(scheme);
  const bool e5m2 = kv_codec(scheme) == KvCodec::kE5m2;
  // Every element on its own (in parallel: the same values on any number of threads).
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < p.num_tokens(); ++t) {
    for (int head = 0; head < 2 * Hkv; ++head) {
      const int g = head % Hkv;
      const std::vector<float>& s = head < Hkv ? scales.k : scales.v;
      const float scale = source == KvScaleSource::kPerHead     ? s[g]
                          : source == KvScaleSource::kPerTensor ? s[0]
                                                                : 1.0f;
      for (int d = 0; d < D; ++d) {
        const int64_t e = (t * 2 * Hkv + head) * D + d;
        const float x = bf16_to_float(p.kv[e]);
        in.kv[e] = e5m2 ? static_cast<double>(e5m2_to_float(quantize_e5m2(x, scale))) * scale
                        : round_trip(x, scale);
      }
    }
  }
  if (fp8_q(scheme)) {
    const std::vector<float> dynamic = dynamic_q_scales(p);
    const int group = Hq / Hkv;
    for (int b = 0; b < p.num_requests(); ++b) {
      for (int64_t t = p.cu_seqlens_q[b]; t < p.cu_seqlens_q[b + 1]; ++t) {
        for (int h = 0; h < Hq; ++h) {
          const int g = h / group;
          const float scale = static_q_scale.empty() ? dynamic[static_cast<size_t>(b) * Hkv + g]
                                                     : static_q_scale[g];
          for (int d = 0; d < D; ++d) {
            const int64_t e = (t * Hq + h) * D + d;
            in.q[e] = round_trip(bf16_to_float(p.q[e]), scale);
          }
        }
      }
    }
  }
  return in;
}

// Attention with cached prefix, GQA, in float64: [total_q, Hq, D]. Reads K/V by position (not
// through the slots). softmax_scale 0 means 1/sqrt(D). causal: a new token sees the keys at
// positions <= its own; otherwise all seq_len[b] keys of its request. The rows (new token, query
// head) are independent and each is one thread's, in the same order of operations whatever the
// thread count: the same bits on 2 cores as on 16 (the GPU tests' long cases spend most of their
// time here).
inline std::vector<double> reference_attention(const AttentionProblem& p, const ReferenceInputs& in,
                                               double softmax_scale = 0.0, bool causal = true) {
  const int Hq = p.num_q_heads, Hkv = p.num_kv_heads, D = p.head_dim;
  const int group = Hq / Hkv;
  const double sm = softmax_scale > 0.0 ? softmax_scale : 1.0 / std::sqrt(static_cast<double>(D));
  const int64_t total_q = p.total_q();
  std::vector<double> out(static_cast<size_t>(total_q) * Hq * D, 0.0);
  std::vector<int> token_request(static_cast<size_t>(total_q));
  for (int b = 0; b < p.num_requests(); ++b) {
    for (int i = 0; i < p.q_len(b); ++i) token_request[p.cu_seqlens_q[b] + i] = b;
  }
  const int64_t num_rows = total_q * Hq;
#pragma omp parallel
  {
    std::vector<double> scores;
#pragma omp for schedule(dynamic, 8)
    for (int64_t row = 0; row < num_rows; ++row) {
      const int64_t t = row / Hq;
      const int h = static_cast<int>(row % Hq);
      const int b = token_request[t];
      const int i = static_cast<int>(t - p.cu_seqlens_q[b]);
      const int position = p.seq_len[b] - p.q_len(b) + i;
      const int last_key = causal ? position : p.seq_len[b] - 1;
      const int g = h / group;
      const double* q = &in.q[(t * Hq + h) * D];
      scores.assign(last_key + 1, 0.0);
      double max_score = -std::numeric_limits<double>::infinity();
      for (int j = 0; j <= last_key; ++j) {
        const double* k = &in.kv[((p.kv_begin[b] + j) * 2 * Hkv + g) * D];
        double s = 0.0;
        for (int d = 0; d < D; ++d) s += q[d] * k[d];
        scores[j] = s * sm;
        max_score = std::max(max_score, scores[j]);
      }
      double sum = 0.0;
      double* o = &out[(t * Hq + h) * D];
      for (int j = 0; j <= last_key; ++j) {
        const double w = std::exp(scores[j] - max_score);
        sum += w;
        const double* v = &in.kv[((p.kv_begin[b] + j) * 2 * Hkv + Hkv + g) * D];
        for (int d = 0; d < D; ++d) o[d] += w * v[d];
      }
      for (int d = 0; d < D; ++d) o[d] /= sum;
    }
  }
  return out;
}

// ---- error metrics -------------------------------------------------------------------------

struct ErrorStats {
  double normalized = 0.0;  // ||o - ref|| / ||ref|| over the whole output
  double max_row = 0.0;     // max over rows of ||o_r - ref_r|| / ||ref_r||
  double max_abs = 0.0;     // max |o - ref|
  int64_t nonfinite = 0;    // non-finite values in o (each makes the metrics above infinite)

  std::string str() const {
    char buf[160];
    std::snprintf(buf, sizeof buf, "normalized %.3e, max_row %.3e, max_abs %.3e, nonfinite %lld",
                  normalized, max_row, max_abs, static_cast<long long>(nonfinite));
    return buf;
  }
};

inline std::vector<double> bf16_to_double(const std::vector<uint16_t>& x) {
  std::vector<double> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = bf16_to_float(x[i]);
  return out;
}

// o and ref of the same size, rows of row_len values.
inline ErrorStats compare(const std::vector<double>& o, const std::vector<double>& ref,
                          int row_len) {
  if (o.size() != ref.size() || row_len <= 0 || o.size() % row_len != 0) {
    throw Error("compare: sizes " + std::to_string(o.size()) + " and " +
                std::to_string(ref.size()) + " with rows of " + std::to_string(row_len));
  }
  ErrorStats e;
  double diff_sq = 0.0, ref_sq = 0.0;
  for (size_t r = 0; r < o.size() / row_len; ++r) {
    double row_diff_sq = 0.0, row_ref_sq = 0.0;
    for (size_t i = r * row_len; i < (r + 1) * row_len; ++i) {
      if (!std::isfinite(o[i])) ++e.nonfinite;
      const double diff = o[i] - ref[i];
      row_diff_sq += diff * diff;
      row_ref_sq += ref[i] * ref[i];
      e.max_abs = std::max(e.max_abs, std::fabs(diff));
    }
    diff_sq += row_diff_sq;
    ref_sq += row_ref_sq;
    e.max_row = std::max(e.max_row, std::sqrt(row_diff_sq / std::max(row_ref_sq, 1e-300)));
  }
  e.normalized = std::sqrt(diff_sq / std::max(ref_sq, 1e-300));
  if (e.nonfinite > 0) {
    e.normalized = e.max_row = e.max_abs = std::numeric_limits<double>::infinity();
  }
  return e;
}

inline ErrorStats compare(const std::vector<uint16_t>& o_bf16, const std::vector<double>& ref,
                          int row_len) {
  return compare(bf16_to_double(o_bf16), ref, row_len);
}

// The error of each query head separately: o and ref are [rows, num_heads, head_dim]; entry h
// compares the rows of head h. The whole-output metric is dominated by the heads with the
// largest values; this one shows what happens to the small ones.
inline std::vector<ErrorStats> compare_by_head(const std::vector<double>& o,
                                               const std::vector<double>& ref, int num_heads,
                                               int head_dim) {
  const size_t row = static_cast<size_t>(num_heads) * head_dim;
  if (o.size() != ref.size() || o.size() % row != 0) {
    throw Error("compare_by_head: sizes " + std::to_string(o.size()) + " and " +
                std::to_string(ref.size()) + " with rows of " + std::to_string(row));
  }
  std::vector<ErrorStats> stats;
  for (int h = 0; h < num_heads; ++h) {
    std::vector<double> o_h, ref_h;
    for (size_t base = 0; base < o.size(); base += row) {
      const size_t begin = base + static_cast<size_t>(h) * head_dim;
      o_h.insert(o_h.end(), o.begin() + begin, o.begin() + begin + head_dim);
      ref_h.insert(ref_h.end(), ref.begin() + begin, ref.begin() + begin + head_dim);
    }
    stats.push_back(compare(o_h, ref_h, head_dim));
  }
  return stats;
}

inline std::vector<ErrorStats> compare_by_head(const std::vector<uint16_t>& o_bf16,
                                               const std::vector<double>& ref, int num_heads,
                                               int head_dim) {
  return compare_by_head(bf16_to_double(o_bf16), ref, num_heads, head_dim);
}

// The largest normalized error over heads.
inline double worst_head_error(const std::vector<ErrorStats>& by_head) {
  double worst = 0.0;
  for (const ErrorStats& e : by_head) worst = std::max(worst, e.normalized);
  return worst;
}

// ---- running a problem through a Backend ---------------------------------------------------

struct RunOptions {
  AttentionPhase phase = AttentionPhase::kPrefill;
  float softmax_scale = 0.0f;         // 0: 1/sqrt(D)
  bool causal = true;                 // AttentionParams::causal
  std::vector<float> static_q_scale;  // [Hkv] for fp8-per-head; empty: dynamic Q scales
  int launch_requests = 0;            // > 0: attention over the first requests only (the rest's O
                                      // stays NaN)
  std::vector<int32_t> decode_order;  // AttentionBatch::decode_order; empty: none
  bool slots_in_pages = false;        // AttentionBatch::slots_in_pages (the caller's word)
};

struct AttentionRun {
  std::vector<uint16_t> o;     // [total_q, Hq, D] bf16
  std::vector<float> q_scale;  // [B, Hkv] (fp8-per-head only)
  std::vector<uint8_t> pool;   // the pool after quantize_kv, raw bytes
};

// quantize_kv of every token into a pool pre-filled with NaN (0xff bytes: NaN in bf16, e4m3 and
// e5m2), quantize_q for fp8-per-head, then prefill or decode attention into an O pre-filled with
// NaN.
inline AttentionRun run_attention(Backend& backend, const AttentionProblem& p, KvScheme scheme,
                                  const KvScales& scales, const RunOptions& options = {}) {
  const size_t pool_bytes = static_cast<size_t>(p.pool_elements()) * kv_elem_bytes(scheme);
  BackendBuffer pool(backend, pool_bytes);
  backend.memset(pool.as<void>(), 0xff, pool_bytes);
  BackendBuffer kv(backend, p.kv), kv_slot(backend, p.kv_slot);
  // Empty scale vectors (bf16, fp8-e5m2) still get a buffer; the kernels do not read them.
  const std::vector<float> k_scales = scales.k.empty() ? std::vector<float>{1.0f} : scales.k;
  const std::vector<float> v_scales = scales.v.empty() ? std::vector<float>{1.0f} : scales.v;
  BackendBuffer k_scale(backend, k_scales), v_scale(backend, v_scales);

  KvCacheLayer cache;
  cache.data = pool.as<void>();
  cache.num_slots = p.num_slots;
  cache.num_kv_heads = p.num_kv_heads;
  cache.head_dim = p.head_dim;
  cache.scheme = scheme;
  KvLayerScales layer_scales;
  if (has_kv_scales(scheme)) {
    layer_scales.k = k_scale.as<float>();
    layer_scales.v = v_scale.as<float>();
  }

  QuantizeKvParams qkv;
  qkv.kv = kv.as<uint16_t>();
  qkv.slots = kv_slot.as<int32_t>();
  qkv.num_tokens = p.num_tokens();
  qkv.cache = cache;
  qkv.scales = layer_scales;
  backend.quantize_kv(qkv);

  const int64_t q_elements = p.total_q() * p.num_q_heads * p.head_dim;
  BackendBuffer q(backend, p.q), o(backend, q_elements * sizeof(uint16_t));
  // O starts as NaN (0xffff in bf16): a row the kernel leaves unwritten fails the comparisons,
  // whatever an earlier run left in the allocation.
  backend.memset(o.as<void>(), 0xff, q_elements * sizeof(uint16_t));
  BackendBuffer q_fp8(backend, q_elements),
      q_scale(backend, p.num_requests() * p.num_kv_heads * sizeof(float));
  BackendBuffer seq_len(backend, p.seq_len), cu_seqlens(backend, p.cu_seqlens_q);
  BackendBuffer req_index(backend, p.req_index), req_to_token(backend, p.req_to_token);
  const std::vector<float> static_q =
      options.static_q_scale.empty() ? std::vector<float>{1.0f} : options.static_q_scale;
  BackendBuffer static_q_scale(backend, static_q);
  const std::vector<int32_t> order =
      options.decode_order.empty() ? std::vector<int32_t>{0} : options.decode_order;
  BackendBuffer decode_order(backend, order);

  AttentionParams ap;
  ap.q = q.as<uint16_t>();
  ap.o = o.as<uint16_t>();
  ap.num_q_heads = p.num_q_heads;
  ap.cache = cache;
  ap.scales = layer_scales;
  ap.batch = p.batch(seq_len.as<int32_t>(), cu_seqlens.as<int32_t>(), req_index.as<int32_t>(),
                     req_to_token.as<int32_t>());
  ap.softmax_scale = options.softmax_scale;
  ap.causal = options.causal;
  if (!options.decode_order.empty()) ap.batch.decode_order = decode_order.as<int32_t>();
  ap.batch.slots_in_pages = options.slots_in_pages;
  if (fp8_q(scheme)) {
    QuantizeQParams qq;
    qq.q = q.as<uint16_t>();
    qq.q_fp8 = q_fp8.as<uint8_t>();
    qq.q_scale = q_scale.as<float>();
    qq.static_scale = options.static_q_scale.empty() ? nullptr : static_q_scale.as<float>();
    qq.cu_seqlens_q = cu_seqlens.as<int32_t>();
    qq.num_requests = p.num_requests();
    qq.total_q = p.total_q();
    qq.num_q_heads = p.num_q_heads;
    qq.num_kv_heads = p.num_kv_heads;
    qq.head_dim = p.head_dim;
    backend.quantize_q(qq);
    ap.q = nullptr;
    ap.q_fp8 = q_fp8.as<uint8_t>();
    ap.q_scale = q_scale.as<float>();
  }
  if (options.launch_requests > 0) {
    ap.batch.num_requests = options.launch_requests;
    ap.batch.total_q = p.cu_seqlens_q[options.launch_requests];
  }
  if (options.phase == AttentionPhase::kDecode) {
    backend.decode_attention(ap);
  } else {
    backend.prefill_attention(ap);
  }
  backend.synchronize();

  AttentionRun run;
  run.o = o.download<uint16_t>();
  if (fp8_q(scheme)) run.q_scale = q_scale.download<float>();
  run.pool = pool.download<uint8_t>();
  return run;
}

}  // namespace fp8kv::test
