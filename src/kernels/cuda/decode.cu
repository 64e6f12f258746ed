// Decode attention launcher: picks the kernel (tensor-core for the FP8 schemes, CUDA-core for bf16,
// or as set_decode_variant says) and its instantiation (scheme, head_dim, query heads per CTA),
// the split of the KV length (decode_split.h) and runs the split merge.
#include <cmath>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/decode.cuh"
#include "kernels/decode_split.h"
#include "kernels/cuda/dispatch.h"
#include "kernels/cuda/launchers.h"

namespace fp8kv::cuda {
namespace {

// Combines the splits of one (request, query head): o = sum_s w_s o_s / sum_s w_s with
// w_s = 2^(lse_s - max lse). One CTA per (request, query head), one thread per element of D.
__global__ void decode_merge_kernel(const float* __restrict__ ws_o, const float* __restrict__ ws_lse,
                                    const int32_t* __restrict__ cu_seqlens_q, uint16_t* __restrict__ o,
                                    int num_q_heads, int num_splits, int head_dim) {
  const int b = blockIdx.x / num_q_heads, h = blockIdx.x % num_q_heads;
  const int64_t row0 = (static_cast<int64_t>(b) * num_q_heads + h) * num_splits;
  float mx = -INFINITY;
  for (int s = 0; s < num_splits; ++s) mx = fmaxf(mx, ws_lse[row0 + s]);
  const int64_t q_token = cu_seqlens_q[b];
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float sum_w = 0.0f, sum_o = 0.0f;
    if (mx != -INFINITY) {
      for (int s = 0; s < num_splits; ++s) {
        const float w = exp2f(ws_lse[row0 + s] - mx);
        sum_w += w;
        sum_o += w * ws_o[(row0 + s) * head_dim + d];
      }
    }
    o[(q_token * num_q_heads + h) * head_dim + d] = float_to_bf16_bits(sum_w > 0.0f ? sum_o / sum_w : 0.0f);
  }
}

int g_variant = kDecodeDefault;

// Whether the tensor-core kernel (decode_mma_kernel.cuh) runs for this scheme.
bool use_mma(KvScheme) {
  return g_variant == kDecodeMma || (g_variant == kDecodeDefault && kDecodeMmaIsDefault);
}

// The CUDA-core kernel of (scheme, head_dim, heads) under the selected variant.
template <KvScheme kScheme, int kHeadDim, int kHeads, typename F>
auto with_kernel(F&& f) {
  if constexpr (kHeads == 4) {
    if (g_variant == kDecodeSimtAltOccupancy) {
      return f(DecodeKernel<kScheme, kHeadDim, kHeads, decode_alt_min_blocks<kScheme>()>{});
    }
  }
  return f(DecodeKernel<kScheme, kHeadDim, kHeads>{});
}

int sm_count() {
  int dev = 0, v = 0;
  FP8KV_CUDA_CHECK(cudaGetDevice(&dev));
  FP8KV_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev));
  return v;
}

int heads_per_cta(int group) { return group <= 1 ? 1 : group <= 2 ? 2 : group <= 4 ? 4 : 8; }

struct DecodePlan {
  bool mma = false;     // the tensor-core kernel
  int heads = 1;        // query heads per CTA (1, 2, 4, 8)
  int head_chunks = 1;  // CTAs per (request, KV head) along the query heads
  DecodeSplit split;
};

DecodePlan plan_decode(const AttentionParams& p) {
  DecodePlan plan;
  const int group = p.num_q_heads / p.cache.num_kv_heads;
  plan.mma = use_mma(p.cache.scheme);
  plan.heads = plan.mma ? DecodeMmaKernel<KvScheme::kFp8PerHead, 128>::kMaxHeads : heads_per_cta(group);
  plan.head_chunks = ceil_div(group, plan.heads);
  const int per_sm = FP8KV_DISPATCH_SCHEME(p.cache.scheme, kScheme, [&] {
    return FP8KV_DISPATCH_HEAD_DIM(p.cache.head_dim, kHeadDim, [&] {
      if (plan.mma) return DecodeMmaKernel<kScheme, kHeadDim>::ctas_per_sm();
      return FP8KV_DISPATCH_GROUP_PAD(plan.heads, kHeads, [&] {
        return with_kernel<kScheme, kHeadDim, kHeads>([](auto k) { return decltype(k)::ctas_per_sm(); });
      });
    });
  });
  static const int sms = sm_count();
  const int planned_heads = p.split_kv_heads > 0 ? p.split_kv_heads : p.cache.num_kv_heads;
  const int kv_per_cta = plan.mma ? decode_mma_kv_heads(p.cache.scheme, p.cache.head_dim) : 1;
  const int64_t ctas =
      static_cast<int64_t>(p.batch.num_requests) * ceil_div(planned_heads, kv_per_cta) * plan.head_chunks;
  plan.split = choose_decode_split(ctas, static_cast<int64_t>(sms) * per_sm, p.batch.max_seq_len);
  return plan;
}

}  // namespace

void set_decode_variant(int variant) { g_variant = variant; }
int decode_variant() { return g_variant; }

size_t decode_workspace_bytes(const AttentionParams& p) {
  const DecodePlan plan = plan_decode(p);
  if (plan.split.num_splits == 1) return 0;
  const size_t rows = static_cast<size_t>(p.batch.num_requests) * p.num_q_heads * plan.split.num_splits;
  return rows * (static_cast<size_t>(p.cache.head_dim) + 1) * sizeof(float);
}

void launch_decode_attention(const AttentionParams& p, void* workspace, cudaStream_t stream) {
  if (p.batch.num_requests == 0) return;
  const DecodePlan plan = plan_decode(p);
  const int D = p.cache.head_dim;
  DecodeArgs a;
  const bool q_fp8 = p.cache.scheme == KvScheme::kFp8PerHead;
  a.q = q_fp8 ? static_cast<const void*>(p.q_fp8) : static_cast<const void*>(p.q);
  a.q_scale = p.q_scale;
  a.cache = static_cast<const uint8_t*>(p.cache.data);
  a.k_scale = p.scales.k;
  a.v_scale = p.scales.v;
  a.seq_len = p.batch.seq_len;
  a.cu_seqlens_q = p.batch.cu_seqlens_q;
  a.req_index = p.batch.req_index;
  a.req_to_token = p.batch.req_to_token;
  a.o = p.o;
  a.max_len = p.batch.max_len;
  a.num_q_heads = p.num_q_heads;
  a.num_kv_heads = p.cache.num_kv_heads;
  a.group = p.num_q_heads / p.cache.num_kv_heads;
  a.head_chunks = plan.head_chunks;
  a.num_splits = plan.split.num_splits;
  a.split_tokens = plan.split.split_tokens;
  const float sm_scale = p.softmax_scale != 0.0f ? p.softmax_scale : 1.0f / std::sqrt(static_cast<float>(D));
  a.sm_scale_log2 = sm_scale * kLog2e;
  if (a.num_splits > 1) {
    if (workspace == nullptr) throw Error("decode attention: split-KV needs a workspace (decode_workspace_bytes)");
    const size_t rows = static_cast<size_t>(p.batch.num_requests) * p.num_q_heads * a.num_splits;
    a.ws_o = static_cast<float*>(workspace);
    a.ws_lse = a.ws_o + rows * D;
  }
  const int kv_per_cta = plan.mma ? decode_mma_kv_heads(p.cache.scheme, D) : 1;
  const dim3 grid(a.num_splits, ceil_div(p.cache.num_kv_heads, kv_per_cta) * plan.head_chunks,
                  p.batch.num_requests);
  FP8KV_DISPATCH_SCHEME(p.cache.scheme, kScheme, [&] {
    FP8KV_DISPATCH_HEAD_DIM(D, kHeadDim, [&] {
      if (plan.mma) return DecodeMmaKernel<kScheme, kHeadDim>::launch(a, grid, stream);
      FP8KV_DISPATCH_GROUP_PAD(plan.heads, kHeads, [&] {
        with_kernel<kScheme, kHeadDim, kHeads>([&](auto k) { decltype(k)::launch(a, grid, stream); });
      });
    });
  });
  if (a.num_splits > 1) {
    decode_merge_kernel<<<p.batch.num_requests * p.num_q_heads, D, 0, stream>>>(
        a.ws_o, a.ws_lse, p.batch.cu_seqlens_q, p.o, p.num_q_heads, a.num_splits, D);
    FP8KV_CUDA_CHECK_LAUNCH("decode_merge_kernel");
  }
}

}  // namespace fp8kv::cuda
