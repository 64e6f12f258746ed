// The CPU backend: the reference twin of every CUDA kernel (docs/DESIGN.md, "Numerics").
// Plain host memory, OpenMP over independent output rows, clear before clever.
//
// Attention semantics, shared by every scheme (one code path; scales are a pointer for
// per-head, entry 0 broadcast for per-tensor, 1 for bf16 and fp8-e5m2):
//   q      = Q row as stored: bf16 values, or decoded e4m3 codes (fp8-per-head)
//   k, v   = pool rows as stored: bf16 values, or decoded e4m3 / e5m2 codes (no scale applied)
//   s_j    = (q . k_j) * (q_scale * k_scale * sm_scale)     fp32 dot, scales folded (as FA3)
//   p_j    = exp(s_j - max_j s_j)                            in (0, 1], fp32
//   l      = sum_j p_j                                       fp32, from the unrounded p_j
//   o      = bf16( (sum_j round_p(p_j) * v_j) * (v_scale / l) )
// round_p is the identity except where P V is an e4m3 product (fp8_p, scheme.h: fp8-per-head,
// and fp8-per-tensor's prefill at head_dim 128), where it is e4m3 round-to-nearest-even of
// 2^8 p_j (kPScale, scheme.h), decoded and unscaled (exactly): the GPU casts the unnormalized P
// tile, scaled by 2^8, to e4m3 for the FP8 tensor-core PV product and keeps the row sum in fp32
// from the unrounded (scaled) values, as FlashAttention-3 does; the scale cancels in o. The
// GPU's online softmax subtracts a running max instead of the full-row max, so its P bits can
// differ; its tests compare with a tolerance.
//
// Error this P rounding adds (where fp8_p): for p >= 2^-14 (2^8 p normal in e4m3) the
// rounding is relative, |dp| <= 2^-4 p; below, absolute, |dp| <= 2^-18 (half the subnormal
// step 2^-9, unscaled), and p < 2^-18 rounds to 0. With n visible keys,
//   |o_rounded - o| <= max_j |v_j * v_scale| * (2^-4 + n * 2^-18 / l),   l >= 1,
// a worst case; the errors are unbiased, so the measured error is far smaller (see
// tests/kernels/cpu_backend_test.cpp, CpuBackend.ErrorBoundsReport).
#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "fp8kv/backend.h"
#include "fp8kv/error.h"
#include "fp8kv/fp8.h"
#include "kernels/host_upload.h"
#include "kernels/validate.h"

namespace fp8kv {
namespace {

// Every e4m3 (e5m2) code decoded once (the same values as e4m3_to_float / e5m2_to_float, read
// through a table).
const std::array<float, 256>& e4m3_values() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int c = 0; c < 256; ++c) t[c] = e4m3_to_float(static_cast<uint8_t>(c));
    return t;
  }();
  return table;
}
const std::array<float, 256>& e5m2_values() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int c = 0; c < 256; ++c) t[c] = e5m2_to_float(static_cast<uint8_t>(c));
    return t;
  }();
  return table;
}

// |x| as its bit pattern: comparing these as integers orders NaN > inf > finite, so a max over
// them propagates NaN and infinity (a float max would drop a NaN).
uint32_t abs_bits(float x) { return detail::float_bits(x) & 0x7fffffffu; }

// max(old, new_amax) where either being NaN gives NaN.
float merge_amax(float old, float new_amax) {
  if (std::isnan(old) || std::isnan(new_amax)) return std::numeric_limits<float>::quiet_NaN();
  return std::max(old, new_amax);
}

// Scale of KV head `head` in [0, Hkv): per-head reads the array, per-tensor broadcasts entry 0,
// a scheme without scales (bf16, fp8-e5m2) has scale 1.
float head_scale(const float* scales, KvScheme scheme, int head) {
  switch (kv_scale_source(scheme)) {
    case KvScaleSource::kNone:
      return 1.0f;
    case KvScaleSource::kPerTensor:
      return scales[0];
    case KvScaleSource::kPerHead:
      return scales[head];
  }
  return 1.0f;
}

int num_scales(const KvCacheLayer& cache) {
  return kv_scales_per_layer(cache.scheme, cache.num_kv_heads);
}

// One row of D elements of the pool, [slot, head] with head in [0, 2 * Hkv), as stored values
// (bf16 values, or decoded e4m3 / e5m2 codes without their scale).
void load_pool_row(const KvCacheLayer& cache, int64_t slot, int head, float* out) {
  const int64_t offset = (slot * 2 * cache.num_kv_heads + head) * cache.head_dim;
  const KvCodec codec = kv_codec(cache.scheme);
  if (codec == KvCodec::kBf16) {
    const uint16_t* src = static_cast<const uint16_t*>(cache.data) + offset;
    for (int d = 0; d < cache.head_dim; ++d) out[d] = bf16_to_float(src[d]);
  } else {
    const uint8_t* src = static_cast<const uint8_t*>(cache.data) + offset;
    const std::array<float, 256>& values = codec == KvCodec::kE5m2 ? e5m2_values() : e4m3_values();
    for (int d = 0; d < cache.head_dim; ++d) out[d] = values[src[d]];
  }
}

float dot(const float* a, const float* b, int n) {
  float sum = 0.0f;
  for (int i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

constexpr size_t kUploadChunkBytes = 8u << 20;
constexpr int kMaxUploadThreads = 16;

class CpuBackend final : public Backend {
 public:
  std::string name() const override { return "cpu"; }

  void* alloc(size_t bytes) override {
    void* ptr = std::malloc(bytes == 0 ? 1 : bytes);
    if (ptr == nullptr)
      throw Error("cpu alloc: out of host memory for " + std::to_string(bytes) + " bytes");
    return ptr;
  }
  void free(void* ptr) override { std::free(ptr); }
  void upload(void* dst, const void* host_src, size_t bytes) override {
    if (bytes) std::memcpy(dst, host_src, bytes);
  }
  void download(void* host_dst, const void* src, size_t bytes) override {
    if (bytes) std::memcpy(host_dst, src, bytes);
  }
  void memset(void* dst, int value, size_t bytes) override {
    if (bytes) std::memset(dst, value, bytes);
  }
  void synchronize() override {}
  void upload_tensors(const std::vector<HostUpload>& uploads) override {
    validate_uploads(uploads);
    // Chunks of a few MiB, taken in turn by the workers: the page faults of the file mappings
    // and the conversions spread over all threads.
    const std::vector<UploadChunk> chunks = plan_upload_chunks(uploads, kUploadChunkBytes);
    std::atomic<size_t> next{0};
    run_workers(upload_threads(kMaxUploadThreads), [&](int) {
      for (size_t i = next++; i < chunks.size(); i = next++) {
        const UploadChunk& c = chunks[i];
        const HostUpload& u = uploads[c.upload];
        pack_rows(u, c.row0, c.row1, static_cast<uint8_t*>(u.dst) + c.dst_offset, u.dst_dtype);
      }
    });
  }

  void quantize_kv(const QuantizeKvParams& p) override;
  void quantize_q(const QuantizeQParams& p) override;
  void prefill_attention(const AttentionParams& p) override {
    attention(p, AttentionPhase::kPrefill);
  }
  void decode_attention(const AttentionParams& p) override {
    attention(p, AttentionPhase::kDecode);
  }

 private:
  static void attention(const AttentionParams& p, AttentionPhase phase);
};

void CpuBackend::quantize_kv(const QuantizeKvParams& p) {
  validate_quantize_kv(p);
  check_slots("quantize_kv", p.slots, p.num_tokens, p.cache.num_slots);
  if (has_kv_scales(p.cache.scheme)) {
    check_scales("quantize_kv", "scales.k", p.scales.k, num_scales(p.cache));
    check_scales("quantize_kv", "scales.v", p.scales.v, num_scales(p.cache));
  }
  const int num_heads = 2 * p.cache.num_kv_heads;  // K heads then V heads
  const int hkv = p.cache.num_kv_heads;
  const int D = p.cache.head_dim;
  const KvScheme scheme = p.cache.scheme;
  const KvCodec codec = kv_codec(scheme);
  std::vector<uint32_t> amax_bits(num_heads, 0);  // |x| bits, merged over threads

#pragma omp parallel
  {
    std::vector<uint32_t> local_amax(num_heads, 0);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < p.num_tokens; ++t) {
      const int64_t slot = p.slots[t];
      for (int head = 0; head < num_heads; ++head) {
        const uint16_t* src = p.kv + (t * num_heads + head) * D;   // [D] bf16
        const int64_t dst_offset = (slot * num_heads + head) * D;  // [D] in the pool
        if (codec == KvCodec::kBf16) {
          std::memcpy(static_cast<uint16_t*>(p.cache.data) + dst_offset, src, D * sizeof(uint16_t));
        } else {
          const float scale = head < hkv ? head_scale(p.scales.k, scheme, head)
                                         : head_scale(p.scales.v, scheme, head - hkv);
          uint8_t* dst = static_cast<uint8_t*>(p.cache.data) + dst_offset;
          if (codec == KvCodec::kE5m2) {
            for (int d = 0; d < D; ++d) dst[d] = quantize_e5m2(bf16_to_float(src[d]), scale);
          } else {
            for (int d = 0; d < D; ++d) dst[d] = quantize_e4m3(bf16_to_float(src[d]), scale);
          }
        }
        if (p.observe_amax != nullptr) {
          uint32_t& m = local_amax[head];
          for (int d = 0; d < D; ++d) m = std::max(m, abs_bits(bf16_to_float(src[d])));
        }
      }
    }
#pragma omp critical(fp8kv_quantize_kv_amax)
    for (int head = 0; head < num_heads; ++head) {
      amax_bits[head] = std::max(amax_bits[head], local_amax[head]);
    }
  }

  if (p.observe_amax != nullptr) {
    for (int head = 0; head < num_heads; ++head) {
      p.observe_amax[head] = merge_amax(p.observe_amax[head], detail::bits_float(amax_bits[head]));
    }
  }
}

void CpuBackend::quantize_q(const QuantizeQParams& p) {
  validate_quantize_q(p);
  check_cu_seqlens("quantize_q", p.cu_seqlens_q, p.num_requests, p.total_q);
  if (p.static_scale != nullptr) {
    check_scales("quantize_q", "static_scale", p.static_scale, p.num_kv_heads);
  }
  const int Hq = p.num_q_heads;
  const int Hkv = p.num_kv_heads;
  const int group = Hq / Hkv;  // query heads per KV head
  const int D = p.head_dim;
  const bool need_amax = p.static_scale == nullptr || p.observe_amax != nullptr;
  std::vector<uint32_t> amax_bits(static_cast<size_t>(Hkv), 0);  // observe_amax, as abs_bits

#pragma omp parallel
  {
    std::vector<uint32_t> local_amax(static_cast<size_t>(Hkv), 0);
#pragma omp for collapse(2) schedule(dynamic)
    for (int b = 0; b < p.num_requests; ++b) {
      for (int g = 0; g < Hkv; ++g) {
        const int64_t t_begin = p.cu_seqlens_q[b];
        const int64_t t_end = p.cu_seqlens_q[b + 1];
        // Elements of (request b, KV head g): tokens [t_begin, t_end), heads [g*group,
        // (g+1)*group), all D; each head's D values are contiguous in q [total_q, Hq, D].
        auto element = [&](int64_t t, int i) { return (t * Hq + g * group) * D + i; };
        uint32_t amax = 0;
        if (need_amax) {
          for (int64_t t = t_begin; t < t_end; ++t) {
            for (int i = 0; i < group * D; ++i) {
              amax = std::max(amax, abs_bits(bf16_to_float(p.q[element(t, i)])));
            }
          }
          local_amax[g] = std::max(local_amax[g], amax);
        }
        float scale;
        if (p.static_scale != nullptr) {
          scale = p.static_scale[g];
        } else {
          const float amax_f = detail::bits_float(amax);
          scale = amax_f == 0.0f ? 1.0f : amax_f / kE4m3Max;
        }
        p.q_scale[b * Hkv + g] = scale;
        for (int64_t t = t_begin; t < t_end; ++t) {
          for (int i = 0; i < group * D; ++i) {
            const int64_t e = element(t, i);
            p.q_fp8[e] = quantize_e4m3(bf16_to_float(p.q[e]), scale);
          }
        }
      }
    }
#pragma omp critical(fp8kv_quantize_q_amax)
    for (int g = 0; g < Hkv; ++g) amax_bits[g] = std::max(amax_bits[g], local_amax[g]);
  }

  if (p.observe_amax != nullptr) {
    for (int g = 0; g < Hkv; ++g) {
      p.observe_amax[g] = merge_amax(p.observe_amax[g], detail::bits_float(amax_bits[g]));
    }
  }
}

void CpuBackend::attention(const AttentionParams& p, AttentionPhase phase) {
  validate_attention(p, phase);
  const AttentionBatch& batch = p.batch;
  check_batch(batch, p.cache.num_slots, phase);
  const KvScheme scheme = p.cache.scheme;
  if (has_kv_scales(scheme)) {
    const char* kernel = attention_phase_name(phase);
    check_scales(kernel, "scales.k", p.scales.k, num_scales(p.cache));
    check_scales(kernel, "scales.v", p.scales.v, num_scales(p.cache));
  }

  const int Hq = p.num_q_heads;
  const int Hkv = p.cache.num_kv_heads;
  const int group = Hq / Hkv;
  const int D = p.cache.head_dim;
  const float sm_scale =
      p.softmax_scale > 0.0f ? p.softmax_scale : 1.0f / std::sqrt(static_cast<float>(D));
  const bool fp8_q_rows = fp8_q(scheme);
  const bool round_p = fp8_p(scheme, phase == AttentionPhase::kPrefill, D);
  const std::array<float, 256>& e4m3 = e4m3_values();

  // New token t -> its request.
  std::vector<int> token_request(batch.total_q);
  for (int b = 0; b < batch.num_requests; ++b) {
    for (int t = batch.cu_seqlens_q[b]; t < batch.cu_seqlens_q[b + 1]; ++t) token_request[t] = b;
  }

  const int64_t num_rows = batch.total_q * Hq;  // one output row per (new token, query head)
#pragma omp parallel
  {
    std::vector<float> q(D), kv_row(D), acc(D);
    std::vector<float> scores(std::max(batch.max_seq_len, 1));
#pragma omp for schedule(dynamic, 4)
    for (int64_t row = 0; row < num_rows; ++row) {
      const int64_t t = row / Hq;
      const int h = static_cast<int>(row % Hq);
      const int g = h / group;
      const int b = token_request[t];
      const int q_len = batch.cu_seqlens_q[b + 1] - batch.cu_seqlens_q[b];
      const int position = batch.seq_len[b] - q_len + static_cast<int>(t - batch.cu_seqlens_q[b]);
      // causal: keys at positions <= its own; non-causal: every key of the request (the same
      // for decode, whose one token is the last position).
      const int num_keys = p.causal ? position + 1 : batch.seq_len[b];
      const int32_t* slots =
          batch.req_to_token + static_cast<int64_t>(batch.req_index[b]) * batch.max_len;

      const int64_t q_offset = row * D;  // q, o: [total_q, Hq, D]
      float q_scale = 1.0f;
      if (fp8_q_rows) {
        for (int d = 0; d < D; ++d) q[d] = e4m3[p.q_fp8[q_offset + d]];
        q_scale = p.q_scale[b * Hkv + g];
      } else {
        for (int d = 0; d < D; ++d) q[d] = bf16_to_float(p.q[q_offset + d]);
      }
      const float qk_scale = q_scale * head_scale(p.scales.k, scheme, g) * sm_scale;
      const float v_scale = head_scale(p.scales.v, scheme, g);

      float row_max = -std::numeric_limits<float>::infinity();
      for (int j = 0; j < num_keys; ++j) {
        load_pool_row(p.cache, slots[j], g, kv_row.data());
        scores[j] = dot(q.data(), kv_row.data(), D) * qk_scale;
        row_max = std::max(row_max, scores[j]);
      }

      float row_sum = 0.0f;
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int j = 0; j < num_keys; ++j) {
        const float p_j = std::exp(scores[j] - row_max);
        row_sum += p_j;
        // e4m3 of 2^8 p_j (the kernels' P in (0, 256]: kPScale), unscaled again (exactly).
        const float p_used = round_p ? e4m3[float_to_e4m3(p_j * kPScale)] * (1.0f / kPScale) : p_j;
        load_pool_row(p.cache, slots[j], Hkv + g, kv_row.data());
        for (int d = 0; d < D; ++d) acc[d] += p_used * kv_row[d];
      }
      const float out_scale = v_scale / row_sum;
      for (int d = 0; d < D; ++d) p.o[q_offset + d] = float_to_bf16(acc[d] * out_scale);
    }
  }
}

}  // namespace

std::unique_ptr<Backend> make_cpu_backend() { return std::make_unique<CpuBackend>(); }

}  // namespace fp8kv
