// Decode attention launcher: picks the kernel's instantiation (scheme, head_dim), the split of the
// KV length (decode_split.h) and runs the split merge.
#include <algorithm>
#include <cmath>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/decode.cuh"
#include "kernels/decode_split.h"
#include "kernels/cuda/dispatch.h"
#include "kernels/cuda/launchers.h"

namespace fp8kv::cuda {
namespace {

// Combines the splits of one (request, query head): o = sum_s w_s o_s / sum_s w_s with
// w_s = 2^(lse_s - max lse). One warp per (request, query head): lane l takes dims
// kPer * l .. + kPer - 1 (kPer = D / 32) as vector loads, the split loop unrolled so that several
// splits' loads are in flight at once (the partials sit in L2: latency, not bandwidth, is the cost).
// Launched as a programmatic dependent of the decode kernel: it starts while the decode kernel
// runs and waits for its results at griddepcontrol.wait.
template <int kHeadDim>
__global__ void __launch_bounds__(32) decode_merge_kernel(const float* __restrict__ ws_o,
                                                          const float* __restrict__ ws_lse,
                                                          const int32_t* __restrict__ cu_seqlens_q,
                                                          uint16_t* __restrict__ o, int num_q_heads,
                                                          int num_splits) {
  constexpr int kPer = kHeadDim / 32;  // 2, 4, 8
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
  const int b = blockIdx.x / num_q_heads, h = blockIdx.x % num_q_heads, lane = threadIdx.x;
  const int64_t row0 = (static_cast<int64_t>(b) * num_q_heads + h) * num_splits;
  float mx = -INFINITY;
  for (int s = lane; s < num_splits; s += 32) mx = fmaxf(mx, ws_lse[row0 + s]);
  mx = warp_max(mx);
  float acc[kPer] = {};
  float sum_w = 0.0f;
  if (mx != -INFINITY) {
#pragma unroll 4
    for (int s = 0; s < num_splits; ++s) {
      const float w = exp2f(ws_lse[row0 + s] - mx);
      const float* src = ws_o + (row0 + s) * kHeadDim + kPer * lane;
      float x[kPer];
#pragma unroll
      for (int i = 0; i < kPer; i += 2) {
        const float2 v = *reinterpret_cast<const float2*>(src + i);
        x[i] = v.x;
        x[i + 1] = v.y;
      }
      sum_w += w;
#pragma unroll
      for (int i = 0; i < kPer; ++i) acc[i] += w * x[i];
    }
  }
  uint16_t* dst = o + (static_cast<int64_t>(cu_seqlens_q[b]) * num_q_heads + h) * kHeadDim + kPer * lane;
#pragma unroll
  for (int i = 0; i < kPer; ++i) dst[i] = float_to_bf16_bits(sum_w > 0.0f ? acc[i] / sum_w : 0.0f);
}

int sm_count() {
  int dev = 0, v = 0;
  FP8KV_CUDA_CHECK(cudaGetDevice(&dev));
  FP8KV_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev));
  return v;
}

struct DecodePlan {
  int kv_per_cta = 1;   // adjacent KV heads per CTA (decode_mma_kv_heads)
  int head_chunks = 1;  // CTAs per KV head along the query heads (8 per CTA)
  DecodeSplit split;
  bool shallow = false;  // the shallow ring (decode_shallow_ring)
};

DecodePlan plan_decode(const AttentionParams& p) {
  DecodePlan plan;
  const int group = p.num_q_heads / p.cache.num_kv_heads;
  plan.kv_per_cta = decode_mma_kv_heads(p.cache.scheme, p.cache.head_dim);
  plan.head_chunks = ceil_div(group, DecodeMmaKernel<KvScheme::kBf16, 128>::kMaxHeads);
  int per_sm = 0;
  bool has_shallow = false;
  FP8KV_DISPATCH_SCHEME(p.cache.scheme, kScheme, [&] {
    FP8KV_DISPATCH_HEAD_DIM(p.cache.head_dim, kHeadDim, [&] {
      per_sm = DecodeMmaKernel<kScheme, kHeadDim>::ctas_per_sm();
      has_shallow = DecodeMmaKernel<kScheme, kHeadDim>::has_shallow_ring();
    });
  });
  static const int sms = sm_count();
  // Exact tensor parallelism plans for the whole model's KV heads, so the split (and with it the
  // rounding) does not depend on the rank's share.
  const int planned_heads = p.split_kv_heads > 0 ? p.split_kv_heads : p.cache.num_kv_heads;
  const int64_t ctas = static_cast<int64_t>(p.batch.num_requests) *
                       ceil_div(planned_heads, plan.kv_per_cta) * plan.head_chunks;
  plan.split = choose_decode_split(ctas, static_cast<int64_t>(sms) * per_sm, p.batch.max_seq_len);
  plan.shallow = has_shallow &&
                 decode_shallow_ring(ctas * plan.split.num_splits,
                                     static_cast<int64_t>(sms) * per_sm, plan.split.split_tokens);
  // One split reads a request's keys [0, seq_len): any split_tokens >= every seq_len does. The
  // request table's width is one that stays put while max_seq_len grows, so the launch (and a
  // recorded CUDA graph's key, decode_launch_key) does not change with every decode step.
  if (plan.split.num_splits == 1) {
    plan.split.split_tokens = std::max({p.batch.max_len, p.batch.max_seq_len, 1});
  }
  return plan;
}

#ifdef FP8KV_DECODE_TIMELINE
uint64_t* g_timeline = nullptr;
#endif
}  // namespace
#ifdef FP8KV_DECODE_TIMELINE
void set_decode_timeline(uint64_t* buffer) { g_timeline = buffer; }
#endif

size_t decode_workspace_bytes(const AttentionParams& p) {
  const DecodePlan plan = plan_decode(p);
  if (plan.split.num_splits == 1) return 0;
  const size_t rows = static_cast<size_t>(p.batch.num_requests) * p.num_q_heads * plan.split.num_splits;
  return rows * (static_cast<size_t>(p.cache.head_dim) + 1) * sizeof(float);
}

uint64_t decode_launch_key(const AttentionParams& p) {
  // Everything else the launch reads from p is a shape or a pointer (fixed for a recorded
  // step); the split is what follows max_seq_len. kv_per_cta and head_chunks are functions of
  // the scheme and the shape, kept for a key that stands alone.
  const DecodePlan plan = plan_decode(p);
  return (static_cast<uint64_t>(plan.split.split_tokens) << 32) |
         (static_cast<uint64_t>(plan.split.num_splits) << 16) |
         (static_cast<uint64_t>(plan.shallow) << 15) |
         (static_cast<uint64_t>(plan.kv_per_cta) << 8) | static_cast<uint64_t>(plan.head_chunks);
}

void launch_decode_attention(const AttentionParams& p, void* workspace, cudaStream_t stream,
                             DeviceError* error) {
  if (p.batch.num_requests == 0) return;
  const DecodePlan plan = plan_decode(p);
  const int D = p.cache.head_dim;
  DecodeArgs a;
  static_cast<AttentionArgs&>(a) = attention_args(p, error);
  a.group = p.num_q_heads / p.cache.num_kv_heads;
  a.head_chunks = plan.head_chunks;
  a.num_splits = plan.split.num_splits;
  a.split_tokens = plan.split.split_tokens;
  a.sm_scale_log2 = a.softmax_scale * kLog2e;
#ifdef FP8KV_DECODE_TIMELINE
  a.timeline = g_timeline;
#endif
  if (a.num_splits > 1) {
    if (workspace == nullptr) throw Error("decode attention: split-KV needs a workspace (decode_workspace_bytes)");
    const size_t rows = static_cast<size_t>(p.batch.num_requests) * p.num_q_heads * a.num_splits;
    a.ws_o = static_cast<float*>(workspace);
    a.ws_lse = a.ws_o + rows * D;
  }
  const dim3 grid(a.num_splits, ceil_div(p.cache.num_kv_heads, plan.kv_per_cta) * plan.head_chunks,
                  p.batch.num_requests);
  FP8KV_DISPATCH_SCHEME(p.cache.scheme, kScheme, [&] {
    FP8KV_DISPATCH_HEAD_DIM(D, kHeadDim, [&] {
      DecodeMmaKernel<kScheme, kHeadDim>::launch(a, grid, plan.shallow, stream);
    });
  });
  if (a.num_splits > 1) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(p.batch.num_requests * p.num_q_heads);
    cfg.blockDim = dim3(32);
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    FP8KV_DISPATCH_HEAD_DIM(D, kHeadDim, [&] {
      FP8KV_CUDA_CHECK(cudaLaunchKernelEx(&cfg, decode_merge_kernel<kHeadDim>, static_cast<const float*>(a.ws_o),
                                          static_cast<const float*>(a.ws_lse), p.batch.cu_seqlens_q, p.o,
                                          p.num_q_heads, a.num_splits));
    });
    FP8KV_CUDA_CHECK_LAUNCH("decode_merge_kernel");
  }
}

}  // namespace fp8kv::cuda
