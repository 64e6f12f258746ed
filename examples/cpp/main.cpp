// fp8kv from another C++ project: load a calibration file, quantize a small K/V batch into an
// FP8 pool with the file's layer-0 scales, run one decode step of attention on the CPU backend,
// and compare the output with float64 attention on the unquantized K/V.
//   fp8kv_example CALIB.json
// Exit status 0 when the FP8 output is within 10% (normalized error) of the reference.
#include <fp8kv/backend.h>
#include <fp8kv/calib.h>
#include <fp8kv/error.h>
#include <fp8kv/fp8.h>
#include <fp8kv/kv_pool.h>
#include <fp8kv/version.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

namespace {

constexpr int kGroup = 4;  // query heads per KV head
constexpr int kD = 128;    // head_dim
constexpr double kMaxNormalizedError = 0.1;

// o = softmax(q k^T / sqrt(D)) v in float64 for one query head; q: [D], k and v: [len, D].
void reference_head(const float* q, const std::vector<const float*>& k,
                    const std::vector<const float*>& v, double* o) {
  std::vector<double> s(k.size());
  for (size_t j = 0; j < k.size(); ++j) {
    double dot = 0.0;
    for (int d = 0; d < kD; ++d) dot += static_cast<double>(q[d]) * k[j][d];
    s[j] = dot / std::sqrt(static_cast<double>(kD));
  }
  const double max_s = *std::max_element(s.begin(), s.end());
  double sum = 0.0;
  std::fill(o, o + kD, 0.0);
  for (size_t j = 0; j < k.size(); ++j) {
    const double w = std::exp(s[j] - max_s);
    sum += w;
    for (int d = 0; d < kD; ++d) o[d] += w * v[j][d];
  }
  for (int d = 0; d < kD; ++d) o[d] /= sum;
}

int run(const char* calib_path) {
  // The header's version and the library's must agree: a mismatch means a stale install.
  std::printf("fp8kv %s (headers %s)\n", fp8kv::version(), FP8KV_VERSION_STRING);
  if (std::strcmp(fp8kv::version(), FP8KV_VERSION_STRING) != 0) {
    std::fprintf(stderr, "library and headers differ in version\n");
    return 1;
  }

  const fp8kv::CalibData calib = fp8kv::load_calib(calib_path);
  const fp8kv::RankScales scales = fp8kv::slice_for_rank(calib, /*tp=*/1, /*rank=*/0);
  const bool per_head = calib.quant_type == fp8kv::QuantType::kPerHead;
  const fp8kv::KvScheme scheme =
      per_head ? fp8kv::KvScheme::kFp8PerHead : fp8kv::KvScheme::kFp8PerTensor;
  const int hkv = scales.heads_per_rank;
  const int hq = kGroup * hkv;
  std::printf("%s: %s, %d layers, %d KV heads; layer 0 K scale %g, V scale %g\n", calib_path,
              fp8kv::quant_type_name(calib.quant_type), calib.num_layers, hkv, scales.k_row(0)[0],
              scales.v_row(0)[0]);

  // Three requests whose whole context (the decode token's K/V included) is written now.
  const std::vector<int> seq_len = {7, 19, 33};
  const int num_requests = static_cast<int>(seq_len.size());
  int total_tokens = 0;
  for (int n : seq_len) total_tokens += n;

  std::unique_ptr<fp8kv::Backend> cpu = fp8kv::make_cpu_backend();
  fp8kv::KvPool pool(*cpu, /*num_layers=*/1, /*num_slots=*/256, hkv, kD, scheme);
  fp8kv::RequestTable table(*cpu, /*max_requests=*/8, /*max_len=*/64, pool.num_slots());
  std::vector<int> reqs;
  for (int b = 0; b < num_requests; ++b) reqs.push_back(table.add_request());
  const std::vector<int32_t> slots = table.extend(reqs, seq_len);

  // K/V [tokens, 2 * Hkv, D]: normal values with the spread the calibration saw (abs-max =
  // 448 * scale, taken as 4 standard deviations), stored as bf16.
  std::mt19937 rng(17);
  std::normal_distribution<float> normal;
  std::vector<uint16_t> kv(static_cast<size_t>(total_tokens) * 2 * hkv * kD);
  std::vector<float> kv_f(kv.size());  // the bf16 values as float, for the reference
  for (size_t i = 0; i < kv.size(); ++i) {
    const int head = static_cast<int>(i / kD % (2 * hkv));
    const float scale = head < hkv ? scales.k_row(0)[per_head ? head : 0]
                                   : scales.v_row(0)[per_head ? head - hkv : 0];
    kv[i] = fp8kv::float_to_bf16(normal(rng) * 448.0f * scale / 4.0f);
    kv_f[i] = fp8kv::bf16_to_float(kv[i]);
  }
  fp8kv::QuantizeKvParams write;
  write.kv = kv.data();
  write.slots = slots.data();
  write.num_tokens = total_tokens;
  write.cache = pool.layer(0);
  write.scales = {scales.k_row(0), scales.v_row(0)};
  cpu->quantize_kv(write);  // the CPU backend's memory is host memory

  // One decode step: each request's last token queries its whole context.
  std::vector<uint16_t> q(static_cast<size_t>(num_requests) * hq * kD);
  std::vector<float> q_f(q.size());
  for (size_t i = 0; i < q.size(); ++i) {
    q[i] = fp8kv::float_to_bf16(normal(rng) * 0.1f);
    q_f[i] = fp8kv::bf16_to_float(q[i]);
  }
  std::vector<int32_t> cu_seqlens_q(num_requests + 1), req_index(reqs.begin(), reqs.end());
  for (int b = 0; b <= num_requests; ++b) cu_seqlens_q[b] = b;
  fp8kv::AttentionParams attn;
  attn.q = q.data();
  attn.num_q_heads = hq;
  attn.cache = pool.layer(0);
  attn.scales = {scales.k_row(0), scales.v_row(0)};
  attn.batch.num_requests = num_requests;
  attn.batch.seq_len = seq_len.data();
  attn.batch.cu_seqlens_q = cu_seqlens_q.data();
  attn.batch.req_index = req_index.data();
  attn.batch.req_to_token = table.device_table();
  attn.batch.max_requests = table.max_requests();
  attn.batch.max_len = table.max_len();
  attn.batch.total_q = num_requests;
  attn.batch.max_q_len = 1;
  attn.batch.max_seq_len = *std::max_element(seq_len.begin(), seq_len.end());
  std::vector<uint8_t> q_fp8(q.size());
  std::vector<float> q_scale(static_cast<size_t>(num_requests) * hkv);
  if (per_head) {  // fp8-per-head attention reads an FP8 Q with one scale per (request, KV head)
    fp8kv::QuantizeQParams qq;
    qq.q = q.data();
    qq.q_fp8 = q_fp8.data();
    qq.q_scale = q_scale.data();
    qq.cu_seqlens_q = cu_seqlens_q.data();
    qq.num_requests = num_requests;
    qq.total_q = num_requests;
    qq.num_q_heads = hq;
    qq.num_kv_heads = hkv;
    qq.head_dim = kD;
    cpu->quantize_q(qq);
    attn.q_fp8 = q_fp8.data();
    attn.q_scale = q_scale.data();
  }
  std::vector<uint16_t> o(q.size());
  attn.o = o.data();
  cpu->decode_attention(attn);

  // Float64 reference on the bf16 K/V and Q.
  double diff_sq = 0.0, ref_sq = 0.0;
  std::vector<double> ref(kD);
  int first = 0;
  for (int b = 0; b < num_requests; ++b) {
    for (int h = 0; h < hq; ++h) {
      const int g = h / kGroup;
      std::vector<const float*> k, v;
      for (int t = first; t < first + seq_len[b]; ++t) {
        k.push_back(&kv_f[(static_cast<size_t>(t) * 2 * hkv + g) * kD]);
        v.push_back(&kv_f[(static_cast<size_t>(t) * 2 * hkv + hkv + g) * kD]);
      }
      const size_t row = (static_cast<size_t>(b) * hq + h) * kD;
      reference_head(&q_f[row], k, v, ref.data());
      for (int d = 0; d < kD; ++d) {
        const double diff = fp8kv::bf16_to_float(o[row + d]) - ref[d];
        diff_sq += diff * diff;
        ref_sq += ref[d] * ref[d];
      }
    }
    first += seq_len[b];
  }
  const double error = std::sqrt(diff_sq / ref_sq);
  std::printf("%s decode, %d requests, %d tokens in a %zu-byte pool: normalized error %.4f\n",
              fp8kv::scheme_name(scheme), num_requests, total_tokens, pool.bytes(), error);
  if (!(error <= kMaxNormalizedError)) {  // NaN fails too
    std::fprintf(stderr, "error above %g\n", kMaxNormalizedError);
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s CALIB.json\n", argv[0]);
    return 2;
  }
  try {
    return run(argv[1]);
  } catch (const fp8kv::Error& e) {  // thrown inside the library, caught here
    std::fprintf(stderr, "fp8kv: error: %s\n", e.what());
    return 1;
  }
}
