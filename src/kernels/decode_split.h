// Split-KV heuristic for decode attention: a pure host function (unit-tested in
// tests/kernels/decode_split_test.cpp, no GPU or nvcc needed). Decode has one query token per
// request, so a CTA per (request, KV head) gives B * Hkv CTAs: far too few to fill 132 SMs when
// the batch is small and the context long. Splitting the KV length over `num_splits` CTAs fills the
// chip at the cost of a small merge (log-sum-exp combine, by the last CTA of each group to finish);
// the model below picks the split count that minimizes (CTAs per SM) x (tokens per CTA + a fixed
// per-CTA overhead). A decode CTA is memory-bound: it streams at its SM's share of the bandwidth,
// so two CTAs on one SM with half the keys each take as long as one with all of them, and a split
// that only doubles up CTAs on the SMs buys nothing but its merge (docs/GPU.md, forty-fourth and
// forty-fifth sessions), where the slots are consecutive; scattered slots need the second CTA's
// copies (double_one_wave_split).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__CUDACC__)
#define FP8KV_SPLIT_HD __host__ __device__ __forceinline__
#else
#define FP8KV_SPLIT_HD inline
#endif

namespace fp8kv::cuda {

struct DecodeSplit {
  int num_splits = 1;    // CTAs along the KV length per (request, KV head, head chunk)
  int split_tokens = 0;  // tokens per split (a multiple of kSplitAlign, or max_seq_len when 1)
};

constexpr int kDecodeMaxSplits = 64;
constexpr int kDecodeMinSplitTokens = 256;  // below this a split costs more than it saves
constexpr int kDecodeSplitAlign = 64;       // whole tiles of every warp of a CTA
constexpr int kDecodeCtaOverheadTokens = 128;
// Split launches count the arrivals of each group's splits (one counter per unsplit CTA) in a
// fixed region of the decode workspace that must stay zero between launches whatever the shapes;
// a grid of more unsplit CTAs than that is not split (it fills the GPU many times over anyway).
constexpr int64_t kDecodeMaxSplitGroups = 4096;
// More splits than kDecodeTwoLevelMergeAbove merge in two levels (sub-groups of kDecodeMergeFanIn
// adjacent splits, then the sub-groups' partials), each sub-group counting its arrivals too: the
// region holds one group counter per group, then kDecodeMergeSubGroups sub-group counters per
// group. One merge measured faster up to 16 splits (twenty-eighth session) and at 33 (B=1
// L=131072 on 132 SMs, the per-SM plan's one wave: fp8-per-head 73.9 -> 72.6 us, bf16 136.7 ->
// 135.7; fifty-fifth session; again with the final merge in registers, 72.5 -> 72.0, fifty-ninth),
// two levels at 63 (twenty-eighth); 34..63 are not measured and the line is drawn between them
// (docs/GPU.md).
constexpr int kDecodeMergeFanIn = 8;
constexpr int kDecodeTwoLevelMergeAbove = 40;
constexpr int kDecodeMergeSubGroups = kDecodeMaxSplits / kDecodeMergeFanIn;
constexpr int64_t kDecodeSplitCounters = kDecodeMaxSplitGroups * (1 + kDecodeMergeSubGroups);
static_assert(kDecodeMaxSplits % kDecodeMergeFanIn == 0, "whole sub-groups of counters");

// Up to this many splits a one-wave launch makes each group's splits a thread block cluster: the
// splits' partials stay in their CTAs' shared memory and the cluster's CTAs merge them there, each
// a share of the group's outputs (distributed shared memory), where the counter merge's last CTA
// stores, counts and reads them back through L2 (decode_mma_kernel.cuh, merge_group_in_cluster).
// The kernel merges clusters of up to the portable size, 8; planned with one CTA an SM, groups of
// 8 splits merged slower in clusters than by the counter (a cluster's CTAs share a GPC, and may
// share an SM while others idle), so clusters are pairs (docs/GPU.md, forty-fourth and forty-fifth
// sessions).
constexpr int kDecodeClusterMergeMaxSplits = 2;

// max_seq_len keys in about `splits` splits: each split's tokens rounded up to whole tiles
// (kDecodeSplitAlign), and as many splits as those tokens need (possibly fewer than asked).
inline DecodeSplit aligned_split(int max_seq_len, int splits) {
  int tokens = (max_seq_len + splits - 1) / splits;
  tokens = (tokens + kDecodeSplitAlign - 1) / kDecodeSplitAlign * kDecodeSplitAlign;
  return {(max_seq_len + tokens - 1) / tokens, tokens};
}

// ctas: CTAs without splitting (B * Hkv * head chunks); sms: the SMs they spread over (0: the
// kernel cannot run, no split); max_seq_len: the longest request.
inline DecodeSplit choose_decode_split(int64_t ctas, int64_t sms, int max_seq_len) {
  DecodeSplit best{1, std::max(max_seq_len, 1)};
  if (ctas <= 0 || ctas > kDecodeMaxSplitGroups || sms <= 0 ||
      max_seq_len <= kDecodeMinSplitTokens) {
    return best;
  }
  auto cost = [&](int64_t splits, int64_t tokens) {
    const int64_t per_sm = (ctas * splits + sms - 1) / sms;
    return per_sm * (tokens + kDecodeCtaOverheadTokens);
  };
  int64_t best_cost = cost(1, max_seq_len);
  for (int s = 2; s <= kDecodeMaxSplits; ++s) {
    const DecodeSplit candidate = aligned_split(max_seq_len, s);
    if (candidate.split_tokens < kDecodeMinSplitTokens) break;
    const int64_t c = cost(candidate.num_splits, candidate.split_tokens);
    // A split must win clearly (5%): the merge and the partial-result traffic are not modeled.
    if (c * 20 < best_cost * 19) {
      best_cost = c;
      best = candidate;
    }
  }
  return best;
}

// A launch that choose_decode_split leaves at one CTA an SM or fewer (unsplit, or split to fill the
// SMs once), over kDecodeDoubleSplitFromTokens keys or more, where the kernel's SM holds two CTAs
// (ctas_per_sm), takes twice the splits (unsplit: two, each group's pair merged in a cluster; at
// most kDecodeMaxSplits) unless the caller's slots lie in pages (AttentionBatch::slots_in_pages):
// two CTAs an SM. The second CTA doubles the SM's copy issuers, which scattered slots need (a
// tensor copy per row, where consecutive slots take one per warp's rows). H200, fp8-per-head,
// twice the splits against the plan's (docs/GPU.md, fifty-seventh session): shuffled slots
// -14.6% (B=32 L=4096) to -18.7% (L=16384) unsplit, -15% to -18% split (B=1 L=131072, B=4 and 8
// at L=32768), -26% to -31% at head_dim 64; consecutive slots +5.6% (L=4096), +3.3% (8192), +1.2%
// (16384), +0.3% (32768) unsplit, where the merge costs more than the overlap gains (the
// forty-fifth session's plan): hence the caller's word. Below 4096 keys it is not measured.
constexpr int kDecodeDoubleSplitFromTokens = 4096;
inline DecodeSplit double_one_wave_split(DecodeSplit s, int64_t ctas, int64_t sms, int ctas_per_sm,
                                         int max_seq_len, bool slots_in_pages) {
  if (slots_in_pages || ctas <= 0 || ctas * s.num_splits > sms || ctas > kDecodeMaxSplitGroups ||
      ctas_per_sm < 2 || max_seq_len < kDecodeDoubleSplitFromTokens ||
      s.num_splits >= kDecodeMaxSplits) {
    return s;
  }
  const DecodeSplit twice =
      aligned_split(max_seq_len, std::min(2 * s.num_splits, kDecodeMaxSplits));
  return twice.split_tokens < kDecodeMinSplitTokens ? s : twice;
}

// Whether an unsplit decode launch of `items` (request, head group) CTAs takes the persistent
// kernel (resident: SMs x its CTAs per SM, 0 where it does not exist): at kDecodePersistentWaves
// waves or more, where one-item CTAs pay a ramp and an epilogue each that their SM's streaming
// does not cover (docs/GPU.md, twenty-third and twenty-fourth sessions).
constexpr int64_t kDecodePersistentWaves = 2;
inline bool decode_persistent(int64_t items, int64_t resident, int num_splits) {
  return num_splits == 1 && resident > 0 && items >= kDecodePersistentWaves * resident;
}

// A request's place in the longest-first order of decode work: 8 buckets an octave of its tiles
// (0: none), rising with the tiles, kDecodeOrderBuckets in all. The persistent kernel deals its
// later items in this order (build_order), and AttentionBatch::decode_order is one.
constexpr int kDecodeOrderBuckets = 256;
FP8KV_SPLIT_HD int decode_order_key(int tiles) {
  if (tiles <= 0) return 0;
#if defined(__CUDA_ARCH__)
  const int e = 31 - __clz(tiles);
#else
  int e = 0;  // the highest set bit
  while ((tiles >> (e + 1)) != 0) ++e;
#endif
  return 1 + 8 * e + (e >= 3 ? tiles >> (e - 3) : tiles << (3 - e)) % 8;
}

// Request indices by decode_order_key of their tiles, descending; stable.
inline std::vector<int32_t> decode_longest_first(const std::vector<int>& tiles) {
  std::vector<int32_t> order(tiles.size());
  std::vector<int> key(tiles.size());
  for (size_t i = 0; i < order.size(); ++i) {
    order[i] = static_cast<int32_t>(i);
    key[i] = decode_order_key(tiles[i]);  // once a request, not once a comparison
  }
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t x, int32_t y) { return key[x] > key[y]; });
  return order;
}

// The fields of a decode launch's key (decode_launch_key, launchers.h): what a recorded decode
// step's launch depends on, packed into one word (bits 32..63 split_tokens, 31 gather_rows, 30
// ordered, 16..29 num_splits, 15 persistent, 14 cluster_merge, 8..13 kv_per_cta, 0..7
// head_chunks). One layout for the launcher that packs it and the benches and tests that read it.
struct DecodeLaunchKey {
  int split_tokens = 0;
  int num_splits = 1;
  bool persistent = false;     // the persistent kernel
  bool cluster_merge = false;  // each group's splits a thread block cluster
  int kv_per_cta = 1;          // adjacent KV heads per CTA or item
  int head_chunks = 1;         // CTAs per KV head along the query heads
  bool ordered = false;        // one-item CTAs in the order of AttentionBatch::decode_order
  bool gather_rows = false;    // a one-wave launch: FP8 head_dim 128 warps gather scattered rows
  uint64_t pack() const {
    return (static_cast<uint64_t>(split_tokens) << 32) |
           (static_cast<uint64_t>(gather_rows) << 31) | (static_cast<uint64_t>(num_splits) << 16) |
           (static_cast<uint64_t>(ordered) << 30) | (static_cast<uint64_t>(persistent) << 15) |
           (static_cast<uint64_t>(cluster_merge) << 14) | (static_cast<uint64_t>(kv_per_cta) << 8) |
           static_cast<uint64_t>(head_chunks);
  }
  static DecodeLaunchKey unpack(uint64_t key) {
    DecodeLaunchKey k;
    k.split_tokens = static_cast<int>(key >> 32);
    k.num_splits = static_cast<int>((key >> 16) & 0x3fff);
    k.ordered = ((key >> 30) & 1) != 0;
    k.gather_rows = ((key >> 31) & 1) != 0;
    k.persistent = ((key >> 15) & 1) != 0;
    k.cluster_merge = ((key >> 14) & 1) != 0;
    k.kv_per_cta = static_cast<int>((key >> 8) & 0x3f);
    k.head_chunks = static_cast<int>(key & 0xff);
    return k;
  }
};

}  // namespace fp8kv::cuda
