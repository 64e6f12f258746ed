// fp8kv attention-demo: the three KV schemes side by side on a small random batch, on the CPU
// backend. Calibrates K/V scales the way `calibrate` does (abs-max observed while writing a bf16
// cache, scale = amax / 448), runs prefill over requests with a cached prefix, then one decode
// step, and compares each scheme with a float64 reference on the bf16 inputs.
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "cli/commands.h"
#include "fp8kv/backend.h"
#include "fp8kv/error.h"
#include "fp8kv/fp8.h"
#include "fp8kv/scheme.h"

namespace fp8kv::cli {
namespace {

constexpr int kHq = 8, kHkv = 2, kD = 128;
constexpr int kOutlierChannels = 4;  // per KV head, K channels with gain 20-50
constexpr float kLogitStd = 2.0f;

// The batch: request b has prefix[b] cached tokens, fresh[b] new tokens (prefill) and then one
// decode token. Every token's K/V is kept by position; the pool holds them at shuffled slots.
struct DemoBatch {
  std::vector<int> prefix, fresh;
  std::vector<int64_t> token_begin;  // [B + 1] first token of request b in kv
  std::vector<uint16_t> kv;          // [tokens, 2 * Hkv, D] bf16, request-major, position order
  std::vector<int32_t> slot;         // [tokens]
  std::vector<uint16_t> q_prefill;   // [sum fresh, Hq, D] bf16
  std::vector<uint16_t> q_decode;    // [B, Hq, D] bf16
  int max_len = 0;
  std::vector<int32_t> req_to_token;  // [B, max_len]

  int num_requests() const { return static_cast<int>(prefix.size()); }
  int64_t num_tokens() const { return token_begin.back(); }
};

// head_range: K/V of KV head 1 are this many times larger than those of KV head 0.
DemoBatch make_batch(uint64_t seed, int context, float head_range) {
  const float head_gain[kHkv] = {1.0f, head_range};
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal;
  DemoBatch batch;
  batch.prefix = {context, context / 2, 0};
  batch.fresh = {16, 32, 24};
  const int B = batch.num_requests();
  batch.token_begin = {0};
  for (int b = 0; b < B; ++b) {
    const int seq_len = batch.prefix[b] + batch.fresh[b] + 1;
    batch.token_begin.push_back(batch.token_begin.back() + seq_len);
    batch.max_len = std::max(batch.max_len, seq_len);
  }
  batch.slot.resize(batch.num_tokens());
  std::iota(batch.slot.begin(), batch.slot.end(), 0);
  std::shuffle(batch.slot.begin(), batch.slot.end(), rng);
  batch.req_to_token.assign(static_cast<size_t>(B) * batch.max_len, 0);
  for (int b = 0; b < B; ++b) {
    for (int64_t t = batch.token_begin[b]; t < batch.token_begin[b + 1]; ++t) {
      batch.req_to_token[b * batch.max_len + (t - batch.token_begin[b])] = batch.slot[t];
    }
  }

  // K gains per (head, channel) with outlier channels; Q scaled so logits have kLogitStd.
  std::vector<float> k_gain(kHkv * kD), q_gain(kHkv);
  std::uniform_int_distribution<int> channel(0, kD - 1);
  std::uniform_real_distribution<float> outlier(20.0f, 50.0f);
  for (int g = 0; g < kHkv; ++g) {
    std::fill(&k_gain[g * kD], &k_gain[g * kD] + kD, head_gain[g]);
    for (int i = 0; i < kOutlierChannels; ++i) k_gain[g * kD + channel(rng)] *= outlier(rng);
    double mean_sq = 0.0;
    for (int d = 0; d < kD; ++d) mean_sq += k_gain[g * kD + d] * k_gain[g * kD + d];
    q_gain[g] = static_cast<float>(kLogitStd / std::sqrt(mean_sq / kD));
  }
  batch.kv.resize(batch.num_tokens() * 2 * kHkv * kD);
  for (int64_t t = 0; t < batch.num_tokens(); ++t) {
    for (int head = 0; head < 2 * kHkv; ++head) {
      const int g = head % kHkv;
      for (int d = 0; d < kD; ++d) {
        const float gain = head < kHkv ? k_gain[g * kD + d] : head_gain[g];
        batch.kv[(t * 2 * kHkv + head) * kD + d] = float_to_bf16(normal(rng) * gain);
      }
    }
  }
  auto random_q = [&](int64_t tokens) {
    std::vector<uint16_t> q(tokens * kHq * kD);
    for (size_t i = 0; i < q.size(); ++i) {
      const int h = static_cast<int>(i / kD % kHq);
      q[i] = float_to_bf16(normal(rng) * q_gain[h / (kHq / kHkv)]);
    }
    return q;
  };
  batch.q_prefill = random_q(std::accumulate(batch.fresh.begin(), batch.fresh.end(), 0));
  batch.q_decode = random_q(B);
  return batch;
}

// One attention call's batch description: request b attends with seq_len[b] tokens, the last
// q_len[b] of them new.
struct Step {
  std::vector<int32_t> seq_len, cu_seqlens_q, req_index;
};

Step prefill_step(const DemoBatch& batch) {
  Step s;
  s.cu_seqlens_q = {0};
  for (int b = 0; b < batch.num_requests(); ++b) {
    s.seq_len.push_back(batch.prefix[b] + batch.fresh[b]);
    s.cu_seqlens_q.push_back(s.cu_seqlens_q.back() + batch.fresh[b]);
    s.req_index.push_back(b);
  }
  return s;
}

Step decode_step(const DemoBatch& batch) {
  Step s;
  s.cu_seqlens_q = {0};
  for (int b = 0; b < batch.num_requests(); ++b) {
    s.seq_len.push_back(batch.prefix[b] + batch.fresh[b] + 1);
    s.cu_seqlens_q.push_back(b + 1);
    s.req_index.push_back(b);
  }
  return s;
}

// Float64 causal attention on the bf16 inputs, reading K/V by position: [total_q, Hq, D].
std::vector<double> reference(const DemoBatch& batch, const Step& step,
                              const std::vector<uint16_t>& q) {
  const double sm_scale = 1.0 / std::sqrt(static_cast<double>(kD));
  std::vector<double> out(q.size(), 0.0), scores;
  auto kv_at = [&](int64_t token, int head, int d) {
    return static_cast<double>(bf16_to_float(batch.kv[(token * 2 * kHkv + head) * kD + d]));
  };
  for (int b = 0; b < batch.num_requests(); ++b) {
    const int q_len = step.cu_seqlens_q[b + 1] - step.cu_seqlens_q[b];
    for (int i = 0; i < q_len; ++i) {
      const int64_t t = step.cu_seqlens_q[b] + i;
      const int position = step.seq_len[b] - q_len + i;
      for (int h = 0; h < kHq; ++h) {
        const int g = h / (kHq / kHkv);
        scores.assign(position + 1, 0.0);
        for (int j = 0; j <= position; ++j) {
          double s = 0.0;
          for (int d = 0; d < kD; ++d) {
            s += bf16_to_float(q[(t * kHq + h) * kD + d]) * kv_at(batch.token_begin[b] + j, g, d);
          }
          scores[j] = s * sm_scale;
        }
        const double max_score = *std::max_element(scores.begin(), scores.end());
        double sum = 0.0;
        double* o = &out[(t * kHq + h) * kD];
        for (int j = 0; j <= position; ++j) {
          const double w = std::exp(scores[j] - max_score);
          sum += w;
          for (int d = 0; d < kD; ++d) o[d] += w * kv_at(batch.token_begin[b] + j, kHkv + g, d);
        }
        for (int d = 0; d < kD; ++d) o[d] /= sum;
      }
    }
  }
  return out;
}

struct Errors {
  double normalized = 0.0;  // ||o - ref|| / ||ref|| over the whole output
  double small_head = 0.0;  // the same over the query heads of KV head 0 (the small one)
  double max_abs = 0.0;
};

// o, ref: [tokens, Hq, D].
Errors compare(const std::vector<uint16_t>& o, const std::vector<double>& ref) {
  double diff_sq = 0.0, ref_sq = 0.0, small_diff_sq = 0.0, small_ref_sq = 0.0, max_abs = 0.0;
  for (size_t i = 0; i < o.size(); ++i) {
    const double diff = bf16_to_float(o[i]) - ref[i];
    diff_sq += diff * diff;
    ref_sq += ref[i] * ref[i];
    if (i / kD % kHq < kHq / kHkv) {
      small_diff_sq += diff * diff;
      small_ref_sq += ref[i] * ref[i];
    }
    max_abs = std::isnan(diff) ? diff : std::max(max_abs, std::fabs(diff));
  }
  return {std::sqrt(diff_sq / ref_sq), std::sqrt(small_diff_sq / small_ref_sq), max_abs};
}

// The CPU backend computes on host memory, so host vectors are passed directly.
struct SchemeRun {
  Errors prefill, decode;
  int64_t kv_bytes = 0;
};

SchemeRun run_scheme(Backend& cpu, const DemoBatch& batch, KvScheme scheme,
                     const std::vector<float>& amax /* [2 * Hkv] */) {
  auto to_scale = [](float a) { return a == 0.0f ? 1.0f : a / kE4m3Max; };
  std::vector<float> k_scale, v_scale;
  if (scheme == KvScheme::kFp8PerHead) {
    for (int g = 0; g < kHkv; ++g) {
      k_scale.push_back(to_scale(amax[g]));
      v_scale.push_back(to_scale(amax[kHkv + g]));
    }
  } else {
    k_scale.push_back(to_scale(*std::max_element(amax.begin(), amax.begin() + kHkv)));
    v_scale.push_back(to_scale(*std::max_element(amax.begin() + kHkv, amax.end())));
  }
  const int64_t num_slots = batch.num_tokens();
  const int64_t row = 2 * kHkv * kD;
  std::vector<uint8_t> pool((num_slots + 1) * row * kv_elem_bytes(scheme), 0);
  KvCacheLayer cache{pool.data(), num_slots, kHkv, kD, scheme};
  KvLayerScales scales{k_scale.data(), v_scale.data()};

  // Write the tokens of positions [from, to) of every request into the pool.
  auto write_tokens = [&](auto position_range) {
    std::vector<uint16_t> kv;
    std::vector<int32_t> slots;
    for (int b = 0; b < batch.num_requests(); ++b) {
      const auto [from, to] = position_range(b);
      for (int pos = from; pos < to; ++pos) {
        const int64_t t = batch.token_begin[b] + pos;
        kv.insert(kv.end(), &batch.kv[t * row], &batch.kv[t * row] + row);
        slots.push_back(batch.slot[t]);
      }
    }
    QuantizeKvParams p;
    p.kv = kv.data();
    p.slots = slots.data();
    p.num_tokens = static_cast<int64_t>(slots.size());
    p.cache = cache;
    p.scales = scales;
    cpu.quantize_kv(p);
  };

  auto attend = [&](const Step& step, const std::vector<uint16_t>& q, bool decode) {
    const int B = batch.num_requests();
    const int64_t total_q = step.cu_seqlens_q.back();
    std::vector<uint16_t> o(q.size());
    std::vector<uint8_t> q_fp8(q.size());
    std::vector<float> q_scale(B * kHkv);
    AttentionParams a;
    a.q = q.data();
    a.o = o.data();
    a.num_q_heads = kHq;
    a.cache = cache;
    a.scales = scales;
    a.batch.num_requests = B;
    a.batch.seq_len = step.seq_len.data();
    a.batch.cu_seqlens_q = step.cu_seqlens_q.data();
    a.batch.req_index = step.req_index.data();
    a.batch.req_to_token = batch.req_to_token.data();
    a.batch.max_requests = B;
    a.batch.max_len = batch.max_len;
    a.batch.total_q = total_q;
    for (int b = 0; b < B; ++b) {
      a.batch.max_q_len =
          std::max(a.batch.max_q_len, step.cu_seqlens_q[b + 1] - step.cu_seqlens_q[b]);
      a.batch.max_seq_len = std::max(a.batch.max_seq_len, step.seq_len[b]);
    }
    if (scheme == KvScheme::kFp8PerHead) {
      QuantizeQParams qq;
      qq.q = q.data();
      qq.q_fp8 = q_fp8.data();
      qq.q_scale = q_scale.data();
      qq.cu_seqlens_q = step.cu_seqlens_q.data();
      qq.num_requests = B;
      qq.total_q = total_q;
      qq.num_q_heads = kHq;
      qq.num_kv_heads = kHkv;
      qq.head_dim = kD;
      cpu.quantize_q(qq);
      a.q_fp8 = q_fp8.data();
      a.q_scale = q_scale.data();
    }
    decode ? cpu.decode_attention(a) : cpu.prefill_attention(a);
    return compare(o, reference(batch, step, q));
  };

  SchemeRun run;
  write_tokens([&](int b) { return std::pair{0, batch.prefix[b] + batch.fresh[b]}; });
  run.prefill = attend(prefill_step(batch), batch.q_prefill, false);
  write_tokens([&](int b) {
    const int last = batch.prefix[b] + batch.fresh[b];
    return std::pair{last, last + 1};
  });
  run.decode = attend(decode_step(batch), batch.q_decode, true);
  run.kv_bytes = num_slots * row * kv_elem_bytes(scheme);
  return run;
}

void run_demo(uint64_t seed, int context, float head_range) {
  const DemoBatch batch = make_batch(seed, context, head_range);
  auto cpu = make_cpu_backend();

  // Calibrate as `calibrate` does: observe abs-max while writing every token into a bf16 cache.
  std::vector<float> amax(2 * kHkv, 0.0f);
  {
    std::vector<uint16_t> bf16_pool((batch.num_tokens() + 1) * 2 * kHkv * kD);
    QuantizeKvParams p;
    p.kv = batch.kv.data();
    p.slots = batch.slot.data();
    p.num_tokens = batch.num_tokens();
    p.cache = KvCacheLayer{bf16_pool.data(), batch.num_tokens(), kHkv, kD, KvScheme::kBf16};
    p.observe_amax = amax.data();
    cpu->quantize_kv(p);
  }

  fmt::print(
      "attention-demo: 3 requests, cached prefix {}/{}/{} + new {}/{}/{} tokens, then one "
      "decode step\n",
      batch.prefix[0], batch.prefix[1], batch.prefix[2], batch.fresh[0], batch.fresh[1],
      batch.fresh[2]);
  fmt::print(
      "Hq {}, Hkv {}, D {}; K/V head ranges 1 and {}, {} outlier K channels x20-50; "
      "seed {}\n",
      kHq, kHkv, kD, head_range, kOutlierChannels, seed);
  fmt::print("calibrated amax  K: {:.3g} {:.3g}   V: {:.3g} {:.3g}\n\n", amax[0], amax[1], amax[2],
             amax[3]);
  fmt::print("{:<16}{:>10}  {:>14}  {:>14}  {:>14}  {:>12}\n", "scheme", "KV bytes",
             "prefill error", "  KV head 0", "decode error", "max abs err");
  for (KvScheme scheme : {KvScheme::kBf16, KvScheme::kFp8PerTensor, KvScheme::kFp8PerHead}) {
    const SchemeRun r = run_scheme(*cpu, batch, scheme, amax);
    fmt::print("{:<16}{:>10}  {:>14.3e}  {:>14.3e}  {:>14.3e}  {:>12.3e}\n", scheme_name(scheme),
               r.kv_bytes, r.prefill.normalized, r.prefill.small_head, r.decode.normalized,
               std::max(r.prefill.max_abs, r.decode.max_abs));
  }
  fmt::print(
      "\nerror: ||o - ref|| / ||ref|| against float64 attention on the bf16 inputs; "
      "\"KV head 0\":\nthe prefill error over the query heads of the smaller KV head "
      "(per-tensor scales starve it as --head-range grows)\n");
}

}  // namespace

void add_attention_demo(CLI::App& app) {
  auto* cmd =
      app.add_subcommand("attention-demo",
                         "Compare the bf16, fp8-per-tensor and fp8-per-head KV schemes on a small "
                         "random batch (CPU backend, float64 reference)");
  struct Options {
    uint64_t seed = 1;
    int context = 256;
    float head_range = 30.0f;
  };
  auto options = std::make_shared<Options>();
  cmd->add_option("--seed", options->seed, "random seed")->capture_default_str();
  cmd->add_option("--context", options->context, "cached prefix of the longest request")
      ->capture_default_str()
      ->check(CLI::Range(0, 1 << 16));
  cmd->add_option("--head-range", options->head_range,
                  "how many times larger KV head 1's K/V are than KV head 0's (try 1e4)")
      ->capture_default_str()
      ->check(CLI::Range(1.0f, 1e6f));
  cmd->callback([options] { run_demo(options->seed, options->context, options->head_range); });
}

}  // namespace fp8kv::cli
