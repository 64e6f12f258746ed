// Decode attention (one new token per request) over the token-slot pool: shared declarations of
// decode.cu (launcher, split plan, workspace) and the kernel instantiations (decode_mma_kernel.cuh,
// explicitly instantiated per scheme in
// decode_{bf16,fp8_tensor,fp8_head,fp8_e5m2,fp8_head_bf16q}.cu).
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "fp8kv/scheme.h"
#include "kernels/cuda/attention_args.h"
#include "kernels/cuda/device_error.h"

namespace fp8kv::cuda {

// The cache as the copy engine's tensors (made by the kernel's launch): a slot's K (V) heads as
// 128-byte lines, read in boxes of a launch's kKv heads for `rows` consecutive slots (a warp's
// rows of a tile) or for one slot, landing in the 128-byte swizzle (decode_mma_kernel.cuh).
struct DecodeKvMaps {
  CUtensorMap k_box, v_box, k_row, v_row;
};

// Device arguments of the decode kernel, built by decode.cu from AttentionParams.
struct DecodeArgs : AttentionArgs {  // the shared part (attention_args.h), then decode's own
  float* ws_o = nullptr;             // [B, Hq, num_splits, D] normalized partial outputs
  float* ws_lse = nullptr;           // [B, Hq, num_splits] log2-sum-exp2 of each split
  // [B, gridDim.y] splits of each group (request b, CTA head group blockIdx.y) that have written
  // their partials; zero between launches: the group's last CTA merges and puts it back to zero.
  uint32_t* split_counters = nullptr;
  int group = 0;        // Hq / Hkv
  int head_chunks = 0;  // ceil(group / heads per CTA)
  int num_splits = 1;   // o is written directly when 1, else ws_o / ws_lse and the merge
  int split_tokens = 0;
  float sm_scale_log2 = 0.0f;  // softmax scale * log2(e): scores are kept in the log2 domain
  // The persistent kernel: items (request, head group) in all; it deals them from
  // split_counters[0] and counts its CTAs out in split_counters[1], both zero between launches.
  int num_items = 0;
  int64_t cache_slots = 0;  // rows of the cache: num_slots + 1 (the padding slot)
  // Unsplit one-item grids: the CTAs of blockIdx.z take request request_order[blockIdx.z]
  // (AttentionBatch::decode_order; an entry outside [0, num_requests) is refused), or request
  // blockIdx.z where null.
  const int32_t* request_order = nullptr;
  // AttentionBatch::decode_order where the launch does not read it (split and persistent
  // launches): its entries are still checked against [0, num_requests) (check_unread_order), so
  // that a bad order is refused whichever kernel the shape takes.
  const int32_t* unread_order = nullptr;
  int num_requests = 0;
  // One-item FP8 CTAs at head_dim 128 of a launch that fits one wave: a warp whose rows are not
  // one run of slots gathers them with its lanes' 16-byte copies instead of a tensor copy per row
  // (decode_mma_kernel.cuh, gather_warp_rows).
  bool gather_rows = false;
  DecodeKvMaps kv_maps;  // set by the launch (DecodeMmaKernel::launch*)
#ifdef FP8KV_DECODE_TIMELINE
  uint64_t* timeline = nullptr;  // [entries][kDecodeTimelineFields] (set_decode_timeline), or null
#endif
};
#ifdef FP8KV_DECODE_TIMELINE
// Diagnostic build only: timestamps of the next decode launches (%globaltimer ns) into `buffer`,
// kDecodeTimelineFields per entry, field 4 = SM | type << 32; null stops. bench kernels
// summarizes them per decode row. Type 0, one-item CTAs (entry: the linear CTA id, blockIdx.x
// fastest): start, first tile landed, last tile computed, end, and in field 5 its prologue's
// copies issued (thread 0's). The persistent kernel: type 1 per item (entry: the item) its first
// stage landed, its last tile computed, its output written and its CTA; type 2 per CTA (entry:
// num_items + CTA) the consumers' start, first stage landed, 0 and end (field 5: 0). One-item
// CTAs also stamp their prologue's steps (thread 0's): field 6 the request's row known, field 7
// the stages' barriers set up, field 8 the first tile's copy issued.
constexpr int kDecodeTimelineFields = 9;
void set_decode_timeline(uint64_t* buffer);
#endif

// Adjacent KV heads whose K (or V) rows of one token make a copy of about `copy_bytes`
// (1 to 4 heads).
constexpr int decode_kv_heads_per_copy(KvScheme scheme, int head_dim, int copy_bytes) {
  const int k = copy_bytes / (kv_elem_bytes(scheme) * head_dim);
  return k < 1 ? 1 : k > 4 ? 4 : k;
}

// Adjacent KV heads one CTA of the tensor-core decode kernel takes, so that each copy of a
// token's K (or V) row moves at least about 256 bytes: the copy engine's rate is per copy, and
// rows of one head (128 bytes for e4m3 at head_dim 128) are too small to reach the read
// bandwidth. And at least two heads where their rows make a copy of at most 512 bytes (bf16 at
// head_dim 128, e4m3 at 256), which measured faster than one head's; e4m3 at head_dim 128
// measured slower with four (docs/GPU.md, thirty-first session).
constexpr int decode_mma_kv_heads(KvScheme scheme, int head_dim) {
  return std::max(decode_kv_heads_per_copy(scheme, head_dim, 256),
                  std::min(2, decode_kv_heads_per_copy(scheme, head_dim, 512)));
}

// Adjacent KV heads one item of the persistent decode kernel takes: rows of about 512 bytes,
// since its producer warps issue every copy of the ring (a warp's lanes' copies go one after the
// other, where a tile's slots are not consecutive), but two heads (256 bytes) for e4m3 at
// head_dim 128: twice the items of four heads', so a launch's last round of items, which leaves
// SMs idle, is half as long (measured faster at B=256 L=1024 and B=512 L=512, docs/GPU.md,
// thirty-third session).
constexpr int decode_persistent_kv_heads(KvScheme scheme, int head_dim) {
  const bool e4m3_128 = kv_elem_bytes(scheme) == 1 && head_dim == 128;
  return decode_kv_heads_per_copy(scheme, head_dim, e4m3_128 ? 256 : 512);
}

// Whether a decode launch given AttentionBatch::decode_order runs one-item CTAs in that order
// where it would take the persistent kernel: e4m3 at head_dim 128, whose one-item CTAs read a
// scattered pool's slots faster than the persistent kernel's ring, and whose launches of mixed
// lengths need the order to end as evenly (docs/GPU.md, forty-sixth and forty-seventh sessions).
constexpr bool decode_order_replaces_persistent(KvScheme scheme, int head_dim) {
  return kv_elem_bytes(scheme) == 1 && head_dim == 128;
}

// The decode kernel (decode_mma_kernel.cuh, tensor cores), every scheme: up to 8 query heads of
// each of decode_mma_kv_heads() KV heads per CTA, any head_dim of 64, 128, 256.
template <KvScheme kScheme, int kHeadDim>
struct DecodeMmaKernel {
  static constexpr int kMaxHeads = 8;  // query heads per CTA (rows of the m16 tile in use)
  static int ctas_per_sm();            // of the deep ring (sets its shared-memory limit once)
  // cluster: the grid's splits as clusters, each group merged in shared memory (cluster_merge).
  static void launch(const DecodeArgs& a, dim3 grid, bool cluster, cudaStream_t stream);
  // Whether a split launch of `grid` can merge in clusters: 2 to kDecodeClusterMergeMaxSplits
  // splits (decode_split.h), every CTA resident at once as clusters.
  static bool cluster_merge(dim3 grid);
  // The persistent kernel (decode_mma_persistent_kernel): CTAs per SM; a launch of `ctas` CTAs
  // over a.num_items items of decode_persistent_kv_heads() KV heads each.
  static int persistent_ctas_per_sm();
  static void launch_persistent(const DecodeArgs& a, int ctas, cudaStream_t stream);
};

#define FP8KV_DECODE_MMA_EXTERN(SCHEME)                \
  extern template struct DecodeMmaKernel<SCHEME, 64>;  \
  extern template struct DecodeMmaKernel<SCHEME, 128>; \
  extern template struct DecodeMmaKernel<SCHEME, 256>;
FP8KV_DECODE_MMA_EXTERN(KvScheme::kBf16)
FP8KV_DECODE_MMA_EXTERN(KvScheme::kFp8PerTensor)
FP8KV_DECODE_MMA_EXTERN(KvScheme::kFp8PerHead)
FP8KV_DECODE_MMA_EXTERN(KvScheme::kFp8E5m2)
FP8KV_DECODE_MMA_EXTERN(KvScheme::kFp8PerHeadBf16Q)
#undef FP8KV_DECODE_MMA_EXTERN

}  // namespace fp8kv::cuda
