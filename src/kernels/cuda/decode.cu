// Decode attention launcher: picks the kernel's instantiation (scheme, head_dim) and the split of
// the KV length (decode_split.h), and lays out the split workspace (partials and the counters of
// the merge, which the kernel's last CTA of each group runs: decode_mma_kernel.cuh).
#include <algorithm>
#include <cmath>
#include <string>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/decode.cuh"
#include "kernels/cuda/dispatch.h"
#include "kernels/cuda/launchers.h"
#include "kernels/decode_split.h"

namespace fp8kv::cuda {
namespace {

struct DecodePlan {
  int kv_per_cta = 1;   // adjacent KV heads per CTA (decode_mma_kv_heads; persistent:
                        // decode_persistent_kv_heads)
  int head_chunks = 1;  // CTAs per KV head along the query heads (8 per CTA)
  DecodeSplit split;
  int persistent_ctas = 0;     // > 0: the persistent kernel with this many CTAs (decode_persistent)
  bool cluster_merge = false;  // each group's splits a cluster, merged in shared memory
  bool ordered = false;        // one-item CTAs take the requests in batch.decode_order
  bool gather_rows = false;    // DecodeArgs::gather_rows: a one-item launch of one wave
};

// The one-item kernel's grid: splits x head groups x requests.
dim3 decode_grid(const AttentionParams& p, const DecodePlan& plan) {
  return dim3(plan.split.num_splits,
              ceil_div(p.cache.num_kv_heads, plan.kv_per_cta) * plan.head_chunks,
              p.batch.num_requests);
}

DecodePlan plan_decode(const AttentionParams& p) {
  DecodePlan plan;
  const int group = p.num_q_heads / p.cache.num_kv_heads;
  plan.kv_per_cta = decode_mma_kv_heads(p.cache.scheme, p.cache.head_dim);
  plan.head_chunks = ceil_div(group, DecodeMmaKernel<KvScheme::kBf16, 128>::kMaxHeads);
  int per_sm = 1, per_sm_persistent = 0;
  FP8KV_DISPATCH_SCHEME(p.cache.scheme, kScheme, [&] {
    FP8KV_DISPATCH_HEAD_DIM(p.cache.head_dim, kHeadDim, [&] {
      per_sm = DecodeMmaKernel<kScheme, kHeadDim>::ctas_per_sm();
      per_sm_persistent = DecodeMmaKernel<kScheme, kHeadDim>::persistent_ctas_per_sm();
    });
  });
  static const int sms = device_sm_count();
  // Exact tensor parallelism plans for the whole model's KV heads, so the split (and with it the
  // rounding) does not depend on the rank's share.
  const int planned_heads = p.split_kv_heads > 0 ? p.split_kv_heads : p.cache.num_kv_heads;
  const int64_t ctas = static_cast<int64_t>(p.batch.num_requests) *
                       ceil_div(planned_heads, plan.kv_per_cta) * plan.head_chunks;
  // Planned by CTAs per SM, however many the one-item kernel's SM holds (decode_split.h).
  plan.split = choose_decode_split(ctas, sms, p.batch.max_seq_len);
  // A long one-wave launch of one CTA an SM on slots that may be scattered: twice the splits, two
  // CTAs an SM, where the SM holds them (decode_split.h).
  plan.split = double_one_wave_split(plan.split, ctas, sms, per_sm, p.batch.max_seq_len,
                                     p.batch.slots_in_pages);
  // One split reads a request's keys [0, seq_len): any split_tokens >= every seq_len does. The
  // request table's width is one that stays put while max_seq_len grows, so the launch (and a
  // recorded CUDA graph's key, decode_launch_key) does not change with every decode step.
  if (plan.split.num_splits == 1) {
    plan.split.split_tokens = std::max({p.batch.max_len, p.batch.max_seq_len, 1});
  }
  // The launch's own CTAs (its rank's heads), whatever the split was planned with: an item's
  // bits are the same in either kernel.
  const int persistent_kv = decode_persistent_kv_heads(p.cache.scheme, p.cache.head_dim);
  const int64_t items = static_cast<int64_t>(p.batch.num_requests) *
                        ceil_div(p.cache.num_kv_heads, persistent_kv) * plan.head_chunks;
  const int64_t resident = static_cast<int64_t>(sms) * per_sm_persistent;
  const bool has_order = p.batch.decode_order != nullptr;
  if (!(has_order && decode_order_replaces_persistent(p.cache.scheme, p.cache.head_dim)) &&
      decode_persistent(items, resident, plan.split.num_splits)) {
    plan.persistent_ctas = static_cast<int>(resident);
    plan.kv_per_cta = persistent_kv;
  } else if (plan.split.num_splits == 1) {
    plan.ordered = has_order;  // a split launch's groups merge by request: index order
  } else if (p.batch.num_requests > 0) {
    FP8KV_DISPATCH_SCHEME(p.cache.scheme, kScheme, [&] {
      FP8KV_DISPATCH_HEAD_DIM(p.cache.head_dim, kHeadDim, [&] {
        plan.cluster_merge =
            DecodeMmaKernel<kScheme, kHeadDim>::cluster_merge(decode_grid(p, plan));
      });
    });
  }
  // A one-item launch that fits one wave gathers its scattered rows with its lanes' copies:
  // more bytes in flight an SM than a tensor copy per row (the kernel's SMs then stream nothing
  // else); a launch of several waves keeps the tensor copies, whose issue costs its CTAs' compute
  // warps less.
  if (plan.persistent_ctas == 0) {
    const dim3 grid = decode_grid(p, plan);
    plan.gather_rows =
        static_cast<int64_t>(grid.x) * grid.y * grid.z <= static_cast<int64_t>(sms) * per_sm;
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

// The workspace of a split launch: the group and sub-group counters first (decode_split.h), in a
// region of fixed size and place
// (they must be zero at every launch whatever shapes the workspace served before, and the
// partials of another shape would overwrite a region that moved), then the partial outputs and
// their log-sum-exps.
constexpr size_t kCounterBytes = kDecodeSplitCounters * sizeof(uint32_t);

size_t decode_workspace_bytes(const AttentionParams& p) {
  const DecodePlan plan = plan_decode(p);
  if (plan.persistent_ctas > 0) return kCounterBytes;  // the item counter and the CTAs' count
  if (plan.split.num_splits == 1) return 0;
  const size_t rows =
      static_cast<size_t>(p.batch.num_requests) * p.num_q_heads * plan.split.num_splits;
  return kCounterBytes + rows * (static_cast<size_t>(p.cache.head_dim) + 1) * sizeof(float);
}

void clear_decode_workspace(void* workspace, size_t bytes, cudaStream_t stream) {
  if (workspace == nullptr || bytes == 0) return;
  FP8KV_CUDA_CHECK(cudaMemsetAsync(workspace, 0, bytes, stream));
}

uint64_t decode_launch_key(const AttentionParams& p) {
  // Everything else the launch reads from p is a shape or a pointer (fixed for a recorded
  // step); the split is what follows max_seq_len. kv_per_cta and head_chunks are functions of
  // the scheme and the shape, kept for a key that stands alone.
  const DecodePlan plan = plan_decode(p);
  DecodeLaunchKey k;
  k.split_tokens = plan.split.split_tokens;
  k.num_splits = plan.split.num_splits;
  k.persistent = plan.persistent_ctas > 0;
  k.ordered = plan.ordered;
  k.gather_rows = plan.gather_rows;
  k.cluster_merge = plan.cluster_merge;
  k.kv_per_cta = plan.kv_per_cta;
  k.head_chunks = plan.head_chunks;
  return k.pack();
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
  a.cache_slots = p.cache.num_slots + 1;
  a.num_requests = p.batch.num_requests;
  a.gather_rows = plan.gather_rows;
  if (plan.ordered) {
    a.request_order = p.batch.decode_order;
  } else {
    a.unread_order = p.batch.decode_order;
  }
#ifdef FP8KV_DECODE_TIMELINE
  a.timeline = g_timeline;
#endif
  const dim3 grid = decode_grid(p, plan);
  if (a.num_splits > 1) {
    if (workspace == nullptr)
      throw Error("decode attention: split-KV needs a workspace (decode_workspace_bytes)");
    // choose_decode_split plans with at least this many groups (tp plans with the whole model's
    // KV heads), so they fit the counters.
    if (static_cast<int64_t>(grid.y) * grid.z > kDecodeMaxSplitGroups) {
      throw Error("decode attention: a split launch of " +
                  std::to_string(int64_t{grid.y} * grid.z) + " groups exceeds the workspace's " +
                  std::to_string(kDecodeMaxSplitGroups) + " counters");
    }
    const size_t rows = static_cast<size_t>(p.batch.num_requests) * p.num_q_heads * a.num_splits;
    a.split_counters = static_cast<uint32_t*>(workspace);
    a.ws_o = reinterpret_cast<float*>(static_cast<uint8_t*>(workspace) + kCounterBytes);
    a.ws_lse = a.ws_o + rows * D;
  }
  if (plan.persistent_ctas > 0) {
    if (workspace == nullptr)
      throw Error(
          "decode attention: a persistent launch needs a workspace (decode_workspace_bytes)");
    a.split_counters = static_cast<uint32_t*>(workspace);
    a.num_items = static_cast<int>(grid.y * grid.z);
  }
  FP8KV_DISPATCH_SCHEME(p.cache.scheme, kScheme, [&] {
    FP8KV_DISPATCH_HEAD_DIM(D, kHeadDim, [&] {
      if (plan.persistent_ctas > 0) {
        DecodeMmaKernel<kScheme, kHeadDim>::launch_persistent(a, plan.persistent_ctas, stream);
      } else {
        DecodeMmaKernel<kScheme, kHeadDim>::launch(a, grid, plan.cluster_merge, stream);
      }
    });
  });
}

}  // namespace fp8kv::cuda
