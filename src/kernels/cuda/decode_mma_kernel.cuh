// The decode kernel, every scheme (bf16, fp8-per-tensor, fp8-per-head, fp8-e5m2,
// fp8-per-head-bf16q). Included only by the instantiation files decode_<scheme>.cu; its oracle is
// the CPU twin.
//
// Why tensor cores: on CUDA cores decode is bound by instructions (per-lane dot products,
// cross-lane reductions per query head, widening), not by bytes. Here QK^T and PV run as mma.sync
// m16n8k16 MMAs (fp32 accumulate), one MMA per 16 keys and 16 dims of the head for each product.
//
// Why the copy engine: at Hopper's bandwidth a CTA needs far more bytes in flight than 16-byte
// cp.async per thread sustains (profiled: DRAM at 72% with the SMs mostly idle). A tile's K and V
// rows arrive by tensor copies (TMA, through DecodeArgs' tensor maps) completing on the stage's
// mbarrier: a warp whose rows sit in consecutive slots copies them as one box, every other row is
// a one-row box. The copy engine's cost is per copy, so a CTA takes adjacent KV heads
// (decode_mma_kv_heads): at head_dim 128 two, a row moving both heads' (128 bytes each for e4m3,
// 256 for bf16).
//
// One CTA per (split of the KV length, kKv adjacent KV heads and up to 8 query heads of each,
// request b), 4 warps per KV head. The CTA streams tiles of 64 tokens (K rows then V rows, kKv
// heads wide) into shared memory, gathered through the slot table, kStages deep (128 threads
// hold one row's slot each; one __syncthreads per tile frees the stage for refilling; a CTA of
// two KV heads spreads the one-row copies over all 8 warps, issue_warp_rows_halves). Warp w of a
// KV head computes keys 16w..16w+15 of every tile with its own online softmax (fp32, log2
// domain); the 4 warps are merged in shared memory at the end (one weight per warp and query
// head, computed once) and the CTA writes bf16 (one split) or a normalized partial and its
// log-sum-exp. Split-KV: the CTAs of a group (request b, blockIdx.y: the same KV and query heads,
// every split of the KV length) count their arrivals in the workspace, and the last one to
// arrive merges the group's splits (merge_group_splits; beyond kDecodeTwoLevelMergeAbove splits
// in two levels, sub-groups of adjacent splits first): no second kernel.
//
// Layout: transposed products, so that no MMA row is padding. A GQA group has only 1..8 query
// heads, so they are the N = 8 dimension and keys / dims the M = 16 dimension:
//   S^T = K Q^T   (M = 16 keys, N = 8 heads, K = 16 dims per MMA)
//   O^T += V^T P^T (M = 16 dims, N = 8 heads, K = 16 keys per MMA)
// Query heads past the group's end are zero columns of Q^T, never written out.
//
// Numerics. bf16 cache: bf16 MMAs straight from shared memory (ldmatrix, ldmatrix.trans for V),
// Q as given, P rounded to bf16 for the PV product. FP8 caches: every e4m3 and every e5m2 value
// is an fp16 value (an e5m2 code is the high byte of an fp16), so K and V are widened exactly
// while the A fragments are built (no widened copy in shared memory): the hardware e4m3x2 ->
// f16x2 convert, or one byte permute for e5m2 (the scheme's KvCodec).
//   fp8-per-head:   Q is e4m3 codes (quantize_q): exact in fp16 as well.
//   the bf16-Q FP8 schemes (fp8-per-tensor, fp8-e5m2, fp8-per-head-bf16q): Q is bf16; it is
//                   scaled by a power of two 2^e chosen per CTA so that max |q| lies in
//                   [2^14, 2^15), then rounded to fp16: exact for every value within 2^32 of the
//                   maximum (fp16 keeps 11 bits, bf16 has 8), and 2^-e goes into the score
//                   multiplier. (e5m2 K up to 57344 times Q below 2^15 stays far inside fp32.)
// The Q scale (fp8-per-head), the K scale (KvScaleSource: one per layer, one per KV head, or 1
// for fp8-e5m2), 2^-e and the softmax scale fold into one multiplier of the fp32 scores; the V
// scale is applied once to the output. P is rounded to fp16 for the PV
// MMA (relative error 2^-12, finer than the CPU twin's e4m3 P for fp8-per-head); the row sum l
// is summed from the fp32 P.
//
// MMA fragments (PTX ISA, m16n8k16), lane = 4 * r + t (r = lane / 4, t = lane % 4):
//   A (16 x 16): a[0] = row r, k 2t..2t+1; a[1] = row r+8, same k; a[2], a[3]: k 2t+8..2t+9.
//   B (16 x 8):  b0 = k 2t..2t+1, column r; b1 = k 2t+8..2t+9, column r.
//   C (16 x 8):  c0, c1 = row r, columns 2t, 2t+1; c2, c3 = row r+8.
// The FP8 layout (bf16 uses the plain fragments, see the loops):
// QK^T: a k-step is one 16-byte block of D (16 dims) in a permuted order: k slots 2t, 2t+1,
//   2t+8, 2t+9 hold dims 4t..4t+3 of the block (a dot product does not care about the order).
//   ldmatrix (b16 view) of 8 K rows gives lane (r, t) exactly bytes 4t..4t+3 of key row r: one
//   32-bit word converts to a[0] (low two bytes) and a[2] (high two bytes); Q^T's B fragment is
//   loaded from global memory once in the same order.
// Softmax: lane (r, t) holds the scores of keys r and r+8 for heads 2t and 2t+1; a head's max
//   is reduced over r (3 shuffles). P^T (keys x heads, fp16) becomes P^T's B fragment (keys as
//   k, heads as n) by an in-register 8x8 transpose (movmatrix) of each half.
// PV: V^T's A fragment needs one dim and keys 2t, 2t+1 (and +8): ldmatrix.trans on V rows gives
//   lane (r, t) the bytes V[2t][2r], V[2t][2r+1], V[2t+1][2r], V[2t+1][2r+1] (keys 8.. from the
//   next matrix); one byte permute pairs the keys of dim 2r (row r of the A tile) and of dim
//   2r+1 (row r+8). Lane (r, t) ends up owning dims 2r, 2r+1 of each 16-dim block of O for
//   heads 2t and 2t+1.
// Shared memory: a tile lands dense in the copy engine's 128-byte swizzle (rows a copy apart, no
// padding), and the ldmatrix row addresses follow it (tile_row_bases, decode_tile_layout.h).
#pragma once

#include <cuda_fp16.h>

#include <algorithm>
#include <array>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/decode.cuh"
#include "kernels/cuda/tma.h"
#include "kernels/decode_split.h"
#include "kernels/decode_tile_layout.h"

namespace fp8kv::cuda {
namespace decode_mma {

constexpr int kWarps = 4;                        // warps per KV head of a CTA
constexpr int kIssuers = kWarps * 32;            // threads that issue the tile copies
constexpr int kRows = 8;                         // query heads per CTA: the MMA's N
constexpr int kWarpKeys = 16;                    // keys of a tile per warp (two n8 tiles)
constexpr int kTileTokens = kWarps * kWarpKeys;  // 64: one kDecodeSplitAlign
static_assert(kTileTokens == 64, "splits are aligned to whole tiles (decode_split.h)");
static_assert(2 * kTileTokens == kIssuers, "one thread issues the copy of one K or V row");

// What both decode kernels' rings and merges derive from the heads a CTA (or item) takes.
template <KvScheme kScheme, int D, int kKvHeads>
struct TileShape {
  static constexpr bool kBf16 = kv_codec(kScheme) == KvCodec::kBf16;
  static constexpr int kRowBytes = kBf16 ? 2 * D : D;  // one K or V row of a KV head
  static constexpr int kKv = kKvHeads;                 // adjacent KV heads
  static constexpr int kThreads = kKv * kWarps * 32;   // 4 warps per KV head: the computing ones
  static constexpr int kCopyBytes = kKv * kRowBytes;   // a token's row of the kKv heads
  static constexpr int kSteps = D / 16;                // 16-dim steps: QK k-steps, PV m-tiles
  // A tile in shared memory: its 64 K rows then 64 V rows, kCopyBytes apart, in the copy
  // engine's 128-byte swizzle (tile_row_bases).
  static constexpr int kTileBytes = 2 * kTileTokens * kCopyBytes;
  static constexpr int kVOffset = kTileTokens * kCopyBytes;  // V rows after the K rows
  // 128-byte lines of a KV head's row that one lane reads (half a line at 64 bytes).
  static constexpr int kPieces = kRowBytes >= 128 ? kRowBytes / 128 : 1;
  // The warps' merge: o, m and l of each warp and query head, then a factor per warp and head
  // and the head's log-sum-exp.
  static constexpr int kMergeBytes = kKv * (kWarps * kRows * (D + 3) + kRows) * 4;
  static_assert(kRowBytes % 16 == 0 && kSteps % 2 == 0, "tile shape");
  static_assert(kCopyBytes % 128 == 0 && kTileBytes % 1024 == 0,
                "rows of whole 128-byte lines, tiles of whole 1024-byte swizzle patterns");
};

template <KvScheme kScheme, int D>
struct Shape : TileShape<kScheme, D, decode_mma_kv_heads(kScheme, D)> {
  using Base = TileShape<kScheme, D, decode_mma_kv_heads(kScheme, D)>;
  using Base::kCopyBytes, Base::kMergeBytes;
  static constexpr int kStageBytes = Base::kTileBytes;
  // kStages - 1 tiles in flight while one is computed; CTAs per SM as shared memory allows
  // (copies of 128 / 256 / 512 bytes: 3 / 2 / 1). Grids of several waves run the persistent
  // kernel instead (PersistentShape below), which keeps the ring streaming across items.
  static constexpr int kStages = kCopyBytes <= 128 ? 4 : 3;
  static constexpr int kMinBlocks = kCopyBytes <= 128 ? 3 : kCopyBytes <= 256 ? 2 : 1;
  static constexpr int kRingBytes = kStages * kStageBytes;
  static constexpr int kDataBytes = kRingBytes > kMergeBytes ? kRingBytes : kMergeBytes;
  static constexpr int kSmemBytes = kDataBytes + kStages * 8;  // + one mbarrier per stage
  // A cluster launch's partials (merge_group_in_cluster), after the warps' merge: per KV head,
  // the normalized o of its 8 query-head rows ([kRows, D] floats), then their log-sum-exps.
  static constexpr int kPartialOffset = (kMergeBytes + 15) / 16 * 16;
  static constexpr int kPartialFloats = kRows * D + kRows;  // a KV head's
  static_assert(kPartialOffset + Base::kKv * kPartialFloats * 4 <= kDataBytes,
                "a cluster launch's partials fit the ring");
};

// Four e4m3 codes -> two f16x2 (bytes 0, 1 -> lo; bytes 2, 3 -> hi), exactly.
__device__ __forceinline__ void e4m3x4_to_f16x2x2(uint32_t w, uint32_t& lo, uint32_t& hi) {
  asm("{\n.reg .b16 l, h;\nmov.b32 {l, h}, %2;\n"
      "cvt.rn.f16x2.e4m3x2 %0, l;\ncvt.rn.f16x2.e4m3x2 %1, h;\n}\n"
      : "=r"(lo), "=r"(hi)
      : "r"(w));
}
// Four e5m2 codes -> two f16x2, exactly: each code becomes the high byte of its fp16 (byte
// permutes instead of converts).
__device__ __forceinline__ void e5m2x4_to_f16x2x2(uint32_t w, uint32_t& lo, uint32_t& hi) {
  lo = __byte_perm(w, 0u, 0x1404);  // bytes, low first: 0, b0, 0, b1
  hi = __byte_perm(w, 0u, 0x3424);  // 0, b2, 0, b3
}
// The cache's K/V codec: four codes -> two f16x2.
template <KvCodec kCodec>
__device__ __forceinline__ void fp8x4_to_f16x2x2(uint32_t w, uint32_t& lo, uint32_t& hi) {
  if constexpr (kCodec == KvCodec::kE5m2) {
    e5m2x4_to_f16x2x2(w, lo, hi);
  } else {
    e4m3x4_to_f16x2x2(w, lo, hi);
  }
}

// d += a * b: m16n8k16 f16, fp32 accumulate.
__device__ __forceinline__ void mma_f16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// The 8x8 b16 matrix whose row lane / 4 columns 2 (lane % 4) + {0, 1} this lane holds ->
// the same of its transpose.
__device__ __forceinline__ uint32_t movmatrix_trans(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

// A tensor copy (TMA) of the box at {x, y, z} of the 3D tensor `map` (a __grid_constant__
// kernel parameter: DecodeArgs' tensor maps) into shared memory at dst (1024-byte aligned for a
// box of several rows), completing on mbarrier `bar` with the box's bytes, with an L2 policy.
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const CUtensorMap* map, int x, int y,
                                            int z, uint32_t bar, uint64_t policy) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      ".L2::cache_hint [%0], [%1, {%2, %3, %4}], [%5], %6;\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(z), "r"(bar), "l"(policy)
      : "memory");
}

// A warp's rows of a tile into the stage, both decode kernels: lane i < kLanes (a `copier`) holds
// row i's slot (-1: none) and its place dst (row 0's first). Where the kLanes slots are
// consecutive, lane 0 copies them as one box of box_map and the other copiers arrive on `bar`;
// else each copier with a slot copies its row through row_map (map_y: the rows' first 128-byte
// line in a slot). Every lane of the warp calls it. False where this lane's row is the caller's
// (a copier without a slot: it writes the row and arrives).
template <int kLanes, int kCopyBytes>
__device__ __forceinline__ bool issue_warp_rows(uint32_t dst, uint32_t bar, int slot, bool copier,
                                                const CUtensorMap* box_map,
                                                const CUtensorMap* row_map, int map_y,
                                                uint64_t policy) {
  const int lane = threadIdx.x % 32;
  const int first = __shfl_sync(kFullMask, slot, 0);
  if (__all_sync(kFullMask, !copier || (first >= 0 && slot == first + lane))) {
    if (!copier) return true;
    if (lane == 0) {
      mbarrier_arrive_expect_tx(bar, kLanes * kCopyBytes);
      tma_load_3d(dst, box_map, 0, map_y, first, bar, policy);
    } else {
      mbarrier_arrive(bar);
    }
  } else if (copier && slot >= 0) {
    mbarrier_arrive_expect_tx(bar, kCopyBytes);
    tma_load_3d(dst, row_map, 0, map_y, slot, bar, policy);
  } else {
    return !copier;
  }
  return true;
}

// issue_warp_rows for a pair of warps that hold the same 32 rows' slots (the one-item kernel at
// two KV heads: warps w and w + 4), so that each issues half of the one-row copies (a warp's
// copies go one after another: scattered slots wait on them). `helper`: the second warp.
// Consecutive slots: the first warp's lane 0 copies the box. Else lane i of the first warp copies
// row i < 16, of the second row i >= 16, and the other lane arrives. Every lane of both warps
// arrives once. False where this lane's row is the caller's (its half, no slot: it writes the row
// and arrives).
template <int kCopyBytes>
__device__ __forceinline__ bool issue_warp_rows_halves(uint32_t dst, uint32_t bar, int slot,
                                                       bool helper, const CUtensorMap* box_map,
                                                       const CUtensorMap* row_map, int map_y,
                                                       uint64_t policy) {
  const int lane = threadIdx.x % 32;
  const int first = __shfl_sync(kFullMask, slot, 0);
  if (__all_sync(kFullMask, first >= 0 && slot == first + lane)) {
    if (lane == 0 && !helper) {
      mbarrier_arrive_expect_tx(bar, 32 * kCopyBytes);
      tma_load_3d(dst, box_map, 0, map_y, first, bar, policy);
    } else {
      mbarrier_arrive(bar);
    }
  } else if ((lane >= 16) != helper) {
    mbarrier_arrive(bar);
  } else if (slot >= 0) {
    mbarrier_arrive_expect_tx(bar, kCopyBytes);
    tma_load_3d(dst, row_map, 0, map_y, slot, bar, policy);
  } else {
    return false;
  }
  return true;
}

// The rows first_row .. first_row + kRowsHere - 1 of a warp's 32 (lane i holds row i's slot, -1:
// none; row0_dst: row 0's place), where the slots are not one run, gathered by the warp's own
// lanes: kCopyBytes / 16 lanes a row, a 16-byte cp.async each into the row's swizzled place (zero
// past the slot's heads, `valid` bytes, and for a row without a slot), so that the copies of a
// scattered tile are issued 32 at a time instead of one tensor copy per row. Each lane then
// arrives on `bar` once its copies land (cp.async.mbarrier.arrive.noinc): one arrival per lane,
// as on the box path.
template <int kCopyBytes, int kRowsHere>
__device__ __forceinline__ void gather_warp_rows(uint32_t row0_dst, int slot, int first_row,
                                                 const uint8_t* src0, int64_t slot_bytes, int valid,
                                                 uint32_t bar) {
  constexpr int kChunks = kCopyBytes / 16;
  static_assert((kRowsHere * kChunks) % 32 == 0, "whole warp steps");
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int k = 0; k < kRowsHere * kChunks / 32; ++k) {
    const int idx = lane + 32 * k;
    const int row = first_row + idx / kChunks, c = idx % kChunks;
    const int s = __shfl_sync(kFullMask, slot, row);
    const bool ok = s >= 0 && 16 * c < valid;
    const uint8_t* src = ok ? src0 + s * slot_bytes + 16 * c : src0;
    cp_async_16(swizzle128(row0_dst + row * kCopyBytes + 16 * c), src, ok ? 16 : 0);
  }
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}

// The entries of an order the launch does not read (DecodeArgs::unread_order; the persistent
// kernel's), spread over every thread of the grid: one outside [0, num_requests) is recorded as a
// kDecodeOrder error, as an unsplit ordered launch would; nothing else depends on them.
__device__ __forceinline__ void check_unread_order(const DecodeArgs& a) {
  if (a.unread_order == nullptr) return;
  const int64_t threads = static_cast<int64_t>(gridDim.x) * gridDim.y * gridDim.z * blockDim.x;
  const int64_t cta =
      blockIdx.x + static_cast<int64_t>(gridDim.x) * (blockIdx.y + gridDim.y * blockIdx.z);
  for (int64_t i = cta * blockDim.x + threadIdx.x; i < a.num_requests; i += threads) {
    const int b = a.unread_order[i];
    if (b < 0 || b >= a.num_requests) {
      record_device_error(a.error, DeviceErrorKind::kDecodeOrder, i, b, a.num_requests);
    }
  }
}

// A split launch does not read the order either (its groups merge by request): the merge of
// group (request blockIdx.z, head group 0) checks entry z, one CTA a group (the group's final
// merge: the check's registers stay out of the tile loop, where they spilled at D 64).
static __device__ __noinline__ void check_unread_order_entry(const DecodeArgs& a) {
  if (a.unread_order == nullptr || blockIdx.y != 0 || threadIdx.x != 0) return;
  const int e = a.unread_order[blockIdx.z];
  if (e < 0 || e >= a.num_requests) {
    record_device_error(a.error, DeviceErrorKind::kDecodeOrder, blockIdx.z, e, a.num_requests);
  }
}

// Every split merge's step for one partial, in split order: w x into acc, w into sum_w.
__device__ __forceinline__ void add_weighted(float (&acc)[4], float& sum_w, float w, float4 x) {
  sum_w += w;
  acc[0] += w * x.x;
  acc[1] += w * x.y;
  acc[2] += w * x.z;
  acc[3] += w * x.w;
}
// A merged float4 column: acc / sum_w, or 0 where no split counted a key (`any` false: every
// partial empty, the weights never computed).
__device__ __forceinline__ float4 merged(const float (&acc)[4], float sum_w, bool any) {
  return any ? make_float4(acc[0] / sum_w, acc[1] / sum_w, acc[2] / sum_w, acc[3] / sum_w)
             : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
}
// The merged column as bf16 at dst (the final merges' output).
__device__ __forceinline__ void store_merged(uint16_t* dst, const float (&acc)[4], float sum_w,
                                             bool any) {
  const float4 m = merged(acc, sum_w, any);
  *reinterpret_cast<uint2*>(dst) = make_uint2(pack_bf16x2(m.x, m.y), pack_bf16x2(m.z, m.w));
}

// The query heads of a split-KV group (request b; kv_here KV heads from g0, query heads hc * 8 ..
// of each: `heads` of them) as rows i = 0 .. kv_here * heads - 1, and the partials one merge
// takes: `count` splits from `first`, `stride` apart (every split of the group, or one partial
// per sub-group, merge_group_splits).
struct GroupRows {
  int b, g0, hc, heads, splits;  // splits: a.num_splits, the partials' row length in ws_o / ws_lse
  int first, count, stride;
  int64_t q_token;  // request b's token in q and o (its cu_seqlens_q entry)
  __device__ int head(int i, const DecodeArgs& a) const {
    return (g0 + i / heads) * a.group + hc * kRows + i % heads;
  }
  // Row i's output row (D bf16).
  __device__ uint16_t* out(int i, const DecodeArgs& a, int D) const {
    return a.o + (q_token * a.num_q_heads + head(i, a)) * D;
  }
  // Row i's split 0 in ws_o / ws_lse ([B, Hq, splits]).
  __device__ int64_t split_row0(int i, const DecodeArgs& a) const {
    return (static_cast<int64_t>(b) * a.num_q_heads + head(i, a)) * splits;
  }
};
// The group of this CTA of a split launch (request blockIdx.z, head group blockIdx.y: kKv KV heads
// from g0, query heads hc * 8 .. of each), every split of it (first 0, count splits, stride 1),
// derived from the CTA's indices rather than kept live through the tile loop (registers); the
// request's token is the caller's.
template <class Sh>
__device__ __forceinline__ GroupRows cta_group(const DecodeArgs& a, int64_t q_token) {
  GroupRows g;
  g.g0 = blockIdx.y / a.head_chunks * Sh::kKv;
  g.hc = blockIdx.y % a.head_chunks;
  g.b = blockIdx.z;
  g.heads = min(kRows, a.group - g.hc * kRows);
  g.splits = a.num_splits;
  g.first = 0;
  g.count = a.num_splits;
  g.stride = 1;
  g.q_token = q_token;
  return g;
}

// Merges float4 columns item = threadIdx.x + j * threads (j < kN) of the group's rows x D / 4
// (items past `total` are not this thread's): sum_k w_k o_k / sum_k w_k over the merge's partials
// in order, to bf16 in the output (kFinal) or in place of the first partial (a sub-group's merge).
// The loop is unrolled to keep 8 float4 loads of each thread in flight (the partials sit in L2:
// latency, not bandwidth, is the cost); 4 where three CTAs share an SM (80 registers per thread
// do not hold 8 without spilling). A thread writes only the columns it read.
template <class Sh, int D, int kN, bool kFinal>
__device__ __forceinline__ void merge_columns(const DecodeArgs& a, const GroupRows& g,
                                              const float* s_w, const float* s_mx, int total) {
  constexpr int kVecs = D / 4;  // float4 columns of a row
  constexpr int kInFlight = Sh::kMinBlocks >= 3 ? 4 : 8;
  constexpr int kUnroll = kN >= kInFlight / 2 ? 2 : kInFlight / kN;
  if (static_cast<int>(threadIdx.x) >= total) return;  // no column here (item 0 is the first)
  float* src[kN];
  const float* w_row[kN];
  bool valid[kN];
  float acc[kN][4], sum_w[kN];
  const int64_t step = static_cast<int64_t>(g.stride) * D;
#pragma unroll
  for (int j = 0; j < kN; ++j) {
    const int item = threadIdx.x + j * Sh::kThreads;
    valid[j] = item < total;
    const int i = valid[j] ? item / kVecs : 0;
    src[j] = a.ws_o + (g.split_row0(i, a) + g.first) * D + 4 * (item % kVecs);
    w_row[j] = s_w + i * g.count;
    acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = sum_w[j] = 0.0f;
  }
#pragma unroll kUnroll
  for (int k = 0; k < g.count; ++k) {
#pragma unroll
    for (int j = 0; j < kN; ++j) {
      if (!valid[j]) continue;
      const float4 x = __ldcg(reinterpret_cast<const float4*>(src[j] + k * step));
      add_weighted(acc[j], sum_w[j], w_row[j][k], x);
    }
  }
#pragma unroll
  for (int j = 0; j < kN; ++j) {
    if (!valid[j]) continue;
    const int item = threadIdx.x + j * Sh::kThreads;
    const int i = item / kVecs;
    // Every partial empty (max lse = -inf): 0, as the weights were never computed.
    const bool any = s_mx[i] != -INFINITY && sum_w[j] > 0.0f;
    if constexpr (kFinal) {
      store_merged(g.out(i, a, D) + 4 * (item % kVecs), acc[j], sum_w[j], any);
    } else {
      __stcg(reinterpret_cast<float4*>(src[j]), merged(acc[j], sum_w[j], any));
    }
  }
}

// The final merge of a one-level split (at most kDecodeTwoLevelMergeAbove partials) where each
// thread takes at most one float4 column of the group's rows (merge_group_splits) and a row is one
// warp's or more (D >= 128: the rows' 32 float4 columns a warp): lane k loads split k's and
// k + 32's log-sum-exps of the warp's row while every lane loads its column's first kDirectBatch
// partials, the warp reduces the max and lane k computes split k's weight, which the lanes take
// by shuffles as they sum the partials, kDirectBatch at a time. For up to kDirectBatch splits one
// round trip through L2 where the two-phase merge below takes two, and no barriers. The
// arithmetic and order of the two-phase merge (max lse, w_k = 2^(lse_k - max lse), sums over k in
// order), so the same bits. Only where the launch bounds leave a thread 128 registers or more.
constexpr int kDirectBatch = 8;
template <class Sh, int D>
constexpr bool kDirectMerge = D >= 128 && 65536 / (Sh::kMinBlocks * Sh::kThreads) >= 128;
static_assert(kDecodeTwoLevelMergeAbove <= 64, "two log-sum-exps a lane");
template <class Sh, int D>
__device__ __forceinline__ void merge_column_direct(const DecodeArgs& a, const GroupRows& g,
                                                    int total) {
  constexpr int kVecs = D / 4;  // float4 columns of a row: whole warps
  constexpr int kMaxCount = kDecodeTwoLevelMergeAbove;
  const int item = threadIdx.x, lane = threadIdx.x % 32;
  if (item >= total) return;  // whole warps: total is whole rows
  const int i = item / kVecs;
  const int64_t row0 = g.split_row0(i, a) + g.first;
  const float* o_src = a.ws_o + row0 * D + 4 * (item % kVecs);
  const int64_t step = static_cast<int64_t>(g.stride) * D;
  float4 x[kDirectBatch];
  auto load_batch = [&](int k0) {
#pragma unroll
    for (int k = 0; k < kDirectBatch; ++k) {
      if (k0 + k < g.count) x[k] = __ldcg(reinterpret_cast<const float4*>(o_src + (k0 + k) * step));
    }
  };
  const float* lse_row = a.ws_lse + row0;
  float w_lo = lane < g.count ? __ldcg(lse_row + static_cast<int64_t>(lane) * g.stride) : -INFINITY;
  float w_hi = lane + 32 < g.count ? __ldcg(lse_row + static_cast<int64_t>(lane + 32) * g.stride)
                                   : -INFINITY;
  load_batch(0);
  const float mx = warp_max(fmaxf(w_lo, w_hi));
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f}, sum_w = 0.0f;
  if (mx != -INFINITY) {
    w_lo = exp2f(w_lo - mx);
    w_hi = exp2f(w_hi - mx);
#pragma unroll
    for (int k0 = 0; k0 < kMaxCount; k0 += kDirectBatch) {
      if (k0 >= g.count) break;
      if (k0 > 0) load_batch(k0);
#pragma unroll
      for (int k = 0; k < kDirectBatch; ++k) {
        const int kk = k0 + k;
        const float w = __shfl_sync(kFullMask, kk < 32 ? w_lo : w_hi, kk % 32);
        if (kk < g.count) add_weighted(acc, sum_w, w, x[k]);
      }
    }
  }
  store_merged(g.out(i, a, D) + 4 * (item % kVecs), acc, sum_w, mx != -INFINITY && sum_w > 0.0f);
}

// Split-KV merge of one group (request blockIdx.z; the CTA's KV heads x the query heads of its
// head chunk, blockIdx.y): o = sum_k w_k o_k / sum_k w_k with w_k = 2^(lse_k - max lse) over the
// partials first, first + stride, ... (count of them), accumulated in that order, so the bits do
// not depend on which CTA runs it (the math and order of the former merge kernel, one warp per
// row). kFinal: the group's output. Otherwise a sub-group's partial, written over the first one
// with its log-sum-exp max lse + log2(sum_k w_k): the same normalized form as a split's, so the
// final merge takes it as one. The weights go to shared memory (the ring's, free by now: the
// caller passed a barrier after the CTA's last use of it); then the threads take the group's
// rows x float4 columns (merge_columns) and stream the partials from L2 (ld.global.cg: other CTAs
// wrote them). The group's coordinates come from the CTA's indices (cta_group); the request's
// token (q_token) is the kernel's, live through it anyway for the unsplit store, where a load of
// cu_seqlens_q here stood in the final store's way (B=1 L=131072 -0.2..-0.5%, docs/GPU.md,
// sixty-first session).
template <class Sh, int D, bool kFinal>
__device__ __forceinline__ void merge_group_splits(const DecodeArgs& a, uint8_t* smem, int first,
                                                   int count, int stride, int64_t q_token) {
  if constexpr (kFinal) check_unread_order_entry(a);
  constexpr int kMaxRows = Sh::kKv * kRows;                  // rows (query heads) of a group
  constexpr int kItems = kMaxRows * (D / 4) / Sh::kThreads;  // float4 columns per thread: D / 64
  static_assert(kMaxRows * (D / 4) % Sh::kThreads == 0,
                "the group's rows split evenly over threads");
  static_assert(kMaxRows * (kDecodeMaxSplits + 1) * 4 <= Sh::kDataBytes,
                "the weights fit the ring");
  GroupRows g = cta_group<Sh>(a, q_token);
  g.first = first;
  g.count = count;
  g.stride = stride;
  const int rows = min(Sh::kKv, a.num_kv_heads - g.g0) * g.heads;
  if constexpr (kFinal && kDirectMerge<Sh, D>) {
    if (count <= kDecodeTwoLevelMergeAbove && rows * (D / 4) <= Sh::kThreads) {
      merge_column_direct<Sh, D>(a, g, rows * (D / 4));
      return;
    }
  }
  float* s_w = reinterpret_cast<float*>(smem);      // [rows, count] lse, then the weights
  float* s_mx = s_w + kMaxRows * kDecodeMaxSplits;  // [rows] max lse
  for (int i = threadIdx.x; i < rows * count; i += Sh::kThreads) {
    s_w[i] = __ldcg(a.ws_lse + g.split_row0(i / count, a) + first + (i % count) * stride);
  }
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int i = warp; i < rows; i += Sh::kThreads / 32) {
    float* w = s_w + i * count;
    float mx = -INFINITY;
    for (int k = lane; k < count; k += 32) mx = fmaxf(mx, w[k]);
    mx = warp_max(mx);
    float sum = 0.0f;
    if (mx != -INFINITY) {
      for (int k = lane; k < count; k += 32) {
        w[k] = exp2f(w[k] - mx);
        sum += w[k];
      }
    }
    if (lane == 0) s_mx[i] = mx;
    if constexpr (!kFinal) {
      // The sub-group's log-sum-exp in place of its first partial's (read above, before the
      // barrier, by every thread that needed it).
      sum = warp_sum(sum);
      if (lane == 0) {
        a.ws_lse[g.split_row0(i, a) + first] =
            mx != -INFINITY && sum > 0.0f ? mx + __log2f(sum) : -INFINITY;
      }
    }
  }
  __syncthreads();
  // A group of at most half the rows (GQA 4 fills half of a CTA's 8 query-head columns) on half
  // the columns per thread, each with twice the partials' loads in flight.
  const int total = rows * (D / 4);
  if constexpr (kItems >= 2) {
    if (total <= Sh::kThreads * (kItems / 2)) {
      merge_columns<Sh, D, kItems / 2, kFinal>(a, g, s_w, s_mx, total);
      return;
    }
  }
  merge_columns<Sh, D, kItems, kFinal>(a, g, s_w, s_mx, total);
}

// Split-KV merge of one group in a cluster launch (the group's splits are the cluster's CTAs,
// rank = split): every CTA's partials sit in its shared memory (Shape::kPartialOffset, written by
// merge_warps_and_store) and each CTA merges a run of the group's rows x float4 columns, reading
// the splits' partials from their CTAs' shared memory: the arithmetic of merge_group_splits and
// merge_columns (w_k = 2^(lse_k - max lse), sums over the splits in order), without the workspace's
// stores, the counter's atomic and the reads back through L2. Two cluster barriers: the partials
// written before any is read, and read before any CTA exits (its shared memory goes with it).
// The request's token (q_token) is the kernel's, as for merge_group_splits.
template <class Sh, int D>
__device__ __noinline__ void merge_group_in_cluster(const DecodeArgs& a, const uint8_t* smem,
                                                    int64_t q_token) {
  if (blockIdx.x == 0) check_unread_order_entry(a);  // the group's first CTA
  constexpr int kVecs = D / 4;                       // float4 columns of a row
  constexpr int kUnroll = 4;                         // splits' loads in flight a thread
  const float* parts = reinterpret_cast<const float*>(smem + Sh::kPartialOffset);
  const int splits = a.num_splits;
  const GroupRows g = cta_group<Sh>(a, q_token);
  const int total = min(Sh::kKv, a.num_kv_heads - g.g0) * g.heads * kVecs;
  // CTA `rank` (its split) takes the rank-th of `splits` equal runs of the items.
  const int run = (total + splits - 1) / splits;
  const int end = min(total, (static_cast<int>(blockIdx.x) + 1) * run);
  cluster_sync();
  for (int item = blockIdx.x * run + threadIdx.x; item < end; item += Sh::kThreads) {
    const int i = item / kVecs, c = item % kVecs;
    const int sub = i / g.heads, h = i % g.heads;          // KV head g0 + sub, its query head h
    const float* part = parts + sub * Sh::kPartialFloats;  // the KV head's partials
    float mx = -INFINITY;
#pragma unroll kUnroll
    for (int k = 0; k < splits; ++k) mx = fmaxf(mx, *cluster_peer(part + kRows * D + h, k));
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f}, sum_w = 0.0f;
#pragma unroll kUnroll
    for (int k = 0; k < splits; ++k) {
      // Each split's log-sum-exp read again rather than held (registers).
      const float lse = *cluster_peer(part + kRows * D + h, k);
      const float4 x = *cluster_peer(reinterpret_cast<const float4*>(part + h * D) + c, k);
      // As merge_group_splits: the weights only where some split counted a key.
      add_weighted(acc, sum_w, mx != -INFINITY ? exp2f(lse - mx) : lse, x);
    }
    store_merged(g.out(i, a, D) + 4 * c, acc, sum_w, mx != -INFINITY && sum_w > 0.0f);
  }
  cluster_sync();
}

#ifdef FP8KV_DECODE_TIMELINE
// Diagnostic build: one timeline entry (decode.cuh: four stamps, SM | type << 32, a fifth stamp,
// the one-item prologue's three).
__device__ __forceinline__ void write_timeline(const DecodeArgs& a, int64_t entry, uint64_t e0,
                                               uint64_t e1, uint64_t e2, uint64_t e3, uint64_t type,
                                               uint64_t e5 = 0, uint64_t e6 = 0, uint64_t e7 = 0,
                                               uint64_t e8 = 0) {
  if (a.timeline == nullptr) return;
  uint64_t* e = a.timeline + kDecodeTimelineFields * entry;
  e[0] = e0;
  e[1] = e1;
  e[2] = e2;
  e[3] = e3;
  e[4] = sm_id() | (type << 32);
  e[5] = e5;
  e[6] = e6;
  e[7] = e7;
  e[8] = e8;
}
#endif

// Q^T -> B fragments of the QK k-steps (query head r of the CTA as column r). FP8 caches:
// step k is the 16-byte block k of the K row in the permuted dim order described above, so
// qa[k][0] = dims 16k+4t, +1 and qa[k][1] = dims 16k+4t+2, +3, in fp16. bf16 cache: the plain
// m16n8k16 order, qa[k][0] = dims 16k+2t, +1 and qa[k][1] = dims 16k+2t+8, +9, in bf16.
// Heads past the group's end (r >= num_heads) are zero and never written. Also the score
// multiplier (raw score -> log2-domain logit) and the V scale of KV head g of request b.
template <KvScheme kScheme, int kHeadDim>
__device__ __forceinline__ void load_q(const DecodeArgs& a, int64_t q_token, int b, int g,
                                       int head0, int num_heads, int r, int t,
                                       uint32_t (&qa)[kHeadDim / 16][2], float& mult,
                                       float& v_scale) {
  constexpr bool kBf16 = kv_codec(kScheme) == KvCodec::kBf16;
  constexpr KvScaleSource kScales = kv_scale_source(kScheme);
  constexpr bool kQFp8 = fp8_q(kScheme);
  constexpr int kSteps = kHeadDim / 16;
  mult = a.sm_scale_log2;  // raw score -> log2-domain logit
  {
    const int64_t row = (q_token * a.num_q_heads + head0 + r) * kHeadDim;
    const bool valid = r < num_heads;
    if constexpr (kBf16) {
      const uint16_t* q = static_cast<const uint16_t*>(a.q) + row + 2 * t;
#pragma unroll
      for (int k = 0; k < kSteps; ++k) {
        qa[k][0] = valid ? *reinterpret_cast<const uint32_t*>(q + 16 * k) : 0u;
        qa[k][1] = valid ? *reinterpret_cast<const uint32_t*>(q + 16 * k + 8) : 0u;
      }
    } else if constexpr (kQFp8) {
      const uint8_t* q = static_cast<const uint8_t*>(a.q) + row + 4 * t;
#pragma unroll
      for (int k = 0; k < kSteps; ++k) {
        const uint32_t w = valid ? *reinterpret_cast<const uint32_t*>(q + 16 * k) : 0u;
        e4m3x4_to_f16x2x2(w, qa[k][0], qa[k][1]);
      }
      mult *= a.q_scale[static_cast<int64_t>(b) * a.num_kv_heads + g];
    } else {
      const uint16_t* q = static_cast<const uint16_t*>(a.q) + row + 4 * t;
      uint2 raw[kSteps];
      float amax = 0.0f;
#pragma unroll
      for (int k = 0; k < kSteps; ++k) {
        raw[k] = valid ? *reinterpret_cast<const uint2*>(q + 16 * k) : make_uint2(0u, 0u);
        const float2 x = bf16x2_to_float2(raw[k].x), y = bf16x2_to_float2(raw[k].y);
        amax = fmaxf(amax, fmaxf(fmaxf(fabsf(x.x), fabsf(x.y)), fmaxf(fabsf(y.x), fabsf(y.y))));
      }
      amax = warp_max(amax);
      // 2^e with max |q| * 2^e in [2^14, 2^15): fp16 holds every bf16 value of Q exactly down
      // to 2^-32 of the maximum. Zero or non-finite Q: no scaling (NaN/inf propagate).
      int e = 0;
      if (amax > 0.0f && amax <= 3.0e38f) {
        frexpf(amax, &e);  // amax in [2^(e-1), 2^e)
        e = min(max(15 - e, -120), 120);
      }
      const float up = ldexpf(1.0f, e);
      mult *= ldexpf(1.0f, -e);
#pragma unroll
      for (int k = 0; k < kSteps; ++k) {
        const float2 x = bf16x2_to_float2(raw[k].x), y = bf16x2_to_float2(raw[k].y);
        qa[k][0] = pack_f16x2(x.x * up, x.y * up);
        qa[k][1] = pack_f16x2(y.x * up, y.y * up);
      }
    }
  }
  v_scale = 1.0f;
  if constexpr (kScales != KvScaleSource::kNone) {
    const int scale_index = kScales == KvScaleSource::kPerHead ? g : 0;
    mult *= a.k_scale[scale_index];
    v_scale = a.v_scale[scale_index];
  }
}

// One tile of the warp's 16 keys (key0 ..; keys from t_end on are masked) whose ldmatrix rows
// in the stage are at kw (tile_row_bases, plus the stage's offset; the V rows kVOffset on): S^T,
// the online softmax (m, l) and O^T += V^T P^T.
template <KvScheme kScheme, int kHeadDim, int kPieces, int kVOffset>
__device__ __forceinline__ void tile_step(const uint32_t (&kw)[kPieces],
                                          const uint32_t (&qa)[kHeadDim / 16][2], float mult,
                                          int key0, int t_end, int r, float (&m)[2], float (&l)[2],
                                          float (&o)[kHeadDim / 16][4]) {
  constexpr bool kBf16 = kv_codec(kScheme) == KvCodec::kBf16;
  constexpr KvCodec kCodec = kv_codec(kScheme);
  constexpr int kSteps = kHeadDim / 16;
  // S^T = K Q^T over the warp's 16 keys (M = keys, N = query heads, K = dims), two
  // accumulators (even and odd steps) to halve the dependent MMA chain.
  // st[.][0] = S[key r][head 2t], [1] = S[r][2t+1], [2] = S[r+8][2t], [3] = S[r+8][2t+1].
  float st[2][4] = {};
#pragma unroll
  for (int k = 0; k < kSteps; k += 2) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint32_t kr[4];
      if constexpr (kBf16) {
        ldmatrix_x4(kr, tile_addr(kw, 2 * (k + h)));
        mma_bf16(st[h], kr, qa[k + h][0], qa[k + h][1]);
      } else if (h == 0) {
        ldmatrix_x4(kr, tile_addr(kw, k));
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          uint32_t ka[4];
          fp8x4_to_f16x2x2<kCodec>(kr[2 * hh], ka[0], ka[2]);      // key r
          fp8x4_to_f16x2x2<kCodec>(kr[2 * hh + 1], ka[1], ka[3]);  // key r + 8
          mma_f16(st[hh], ka, qa[k + hh][0], qa[k + hh][1]);
        }
      }
    }
  }
  // Scores in the log2 domain; keys past the end masked.
  const bool valid_lo = key0 + r < t_end, valid_hi = key0 + r + 8 < t_end;
  float x[4];
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const float v = (st[0][e] + st[1][e]) * mult;
    x[e] = (e < 2 ? valid_lo : valid_hi) ? v : -INFINITY;
  }
  float m_new[2];
#pragma unroll
  for (int c = 0; c < 2; ++c) {
    float mx = fmaxf(x[c], x[c + 2]);
    mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 4));
    mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 8));
    mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 16));
    m_new[c] = fmaxf(m[c], mx);
  }
  // The running max rarely moves after the first tiles: rescale only when it does somewhere.
  if (__any_sync(kFullMask, m_new[0] > m[0] || m_new[1] > m[1])) {
    float alpha[2];
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      alpha[c] = m_new[c] > m[c] ? exp2f(m[c] - m_new[c]) : 1.0f;  // m = -inf: alpha = 0
      l[c] *= alpha[c];
      m[c] = m_new[c];
    }
#pragma unroll
    for (int k = 0; k < kSteps; ++k) {
      o[k][0] *= alpha[0];
      o[k][1] *= alpha[1];
      o[k][2] *= alpha[0];
      o[k][3] *= alpha[1];
    }
  }
  // All scores so far masked: P = 0 rather than exp2(-inf - -inf).
  float p[4];
#pragma unroll
  for (int e = 0; e < 4; ++e) p[e] = m[e % 2] == -INFINITY ? 0.0f : exp2f(x[e] - m[e % 2]);
  l[0] += p[0] + p[2];
  l[1] += p[1] + p[3];
  // P^T (keys x heads) -> P's B fragment (keys 2t, 2t+1 and 2t+8, 2t+9 of head r): an 8x8
  // transpose of each half in registers. fp16 for the FP8 caches (e4m3 V is exact in fp16),
  // bf16 for the bf16 cache (the MMA's two operands share a type).
  uint32_t pb0, pb1;
  if constexpr (kBf16) {
    pb0 = movmatrix_trans(pack_bf16x2(p[0], p[1]));
    pb1 = movmatrix_trans(pack_bf16x2(p[2], p[3]));
  } else {
    pb0 = movmatrix_trans(pack_f16x2(p[0], p[1]));
    pb1 = movmatrix_trans(pack_f16x2(p[2], p[3]));
  }

  // O^T += V^T P^T (M = dims, N = heads, K = keys).
#pragma unroll
  for (int k = 0; k < kSteps; k += 2) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint32_t vr[4];
      if constexpr (kBf16) {
        // ldmatrix.trans of 8x8 blocks (keys x dims) gives dim r, keys 2t, 2t+1: [0] keys 0..7
        // dims 0..7, [1] keys 8..15 dims 0..7, [2] keys 0..7 dims 8..15, [3] keys 8..15 dims 8..15.
        ldmatrix_x4_trans(vr, tile_addr(kw, 2 * (k + h)) + kVOffset);
        const uint32_t va[4] = {vr[0], vr[2], vr[1], vr[3]};
        mma_bf16(o[k + h], va, pb0, pb1);
      } else if (h == 0) {
        // One 16-byte block of V per MMA: rows r and r+8 of the A tile are dims 2r and 2r+1.
        ldmatrix_x4_trans(vr, tile_addr(kw, k) + kVOffset);
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          // vr[2hh] holds V[2t][2r], V[2t][2r+1], V[2t+1][2r], V[2t+1][2r+1] (keys 0..7); the
          // byte permute pairs the keys of one dim: [V[2t][2r], V[2t+1][2r] | V[2t][2r+1], ...].
          uint32_t va[4];
          const uint32_t v0 = __byte_perm(vr[2 * hh], 0u, 0x3120);
          const uint32_t v1 = __byte_perm(vr[2 * hh + 1], 0u, 0x3120);
          fp8x4_to_f16x2x2<kCodec>(v0, va[0], va[1]);
          fp8x4_to_f16x2x2<kCodec>(v1, va[2], va[3]);
          mma_f16(o[k + hh], va, pb0, pb1);
        }
      }
    }
  }
}

// Where dim d of query head h sits in its row of the warps' merge (rows of D floats, a multiple of
// the 32 banks): d XOR 8 ((h / 2) % 4). A lane (r, t) writes heads 2t and 2t + 1 at dims that
// depend on r alone, so unswizzled the four t of a dim would share a bank (4-way conflicts on
// every store of the merge); XOR-ing bits 3..4 with t spreads them over the banks, keeps
// adjacent even-odd dims adjacent (float2) and a row's 32-float blocks whole (the reads stay
// conflict-free).
__device__ __forceinline__ int merge_col(int h, int d) { return d ^ (((h >> 1) & 3) << 3); }

// The end of a CTA's work on one (request, split, KV head): merges the KV head's 4 warps in
// `merge_area` (kMergeBytes / kKv of shared memory, free once `sync` has passed: every warp of the
// CTA is done with the tiles there) and writes bf16 (one split) or a normalized partial and its
// log-sum-exp: to the workspace, or in a cluster launch where `part` is given to this CTA's shared
// memory, the KV head's partials there ([kRows, D] floats of o, then kRows log-sum-exps). `sync`
// is the barrier of the CTA's computing threads.
template <class Sh, int kHeadDim, class Sync>
__device__ __forceinline__ void merge_warps_and_store(
    const DecodeArgs& a, uint8_t* merge_area, Sync sync, int warp, int r, int t, int num_heads,
    int head0, int64_t q_token, int b, int split, const float (&m)[2], float (&l)[2],
    const float (&o)[kHeadDim / 16][4], float v_scale, float* part = nullptr) {
  constexpr bool kBf16 = Sh::kBf16;
  constexpr int kSteps = kHeadDim / 16;
#pragma unroll
  for (int c = 0; c < 2; ++c) {
    l[c] += __shfl_xor_sync(kFullMask, l[c], 4);
    l[c] += __shfl_xor_sync(kFullMask, l[c], 8);
    l[c] += __shfl_xor_sync(kFullMask, l[c], 16);
  }

  // Merge the 4 warps in shared memory.
  sync();
  float* s_o = reinterpret_cast<float*>(merge_area);        // [warps, kRows, D]
  float* s_m = s_o + kWarps * kRows * kHeadDim;             // [warps, kRows]
  float* s_l = s_m + kWarps * kRows;                        // [warps, kRows]
  float* o_even = s_o + (warp * kRows + 2 * t) * kHeadDim;  // head 2t
  float* o_odd = o_even + kHeadDim;                         // head 2t + 1
  if constexpr (kBf16) {
#pragma unroll
    for (int k = 0; k < kSteps; ++k) {
      o_even[merge_col(2 * t, 16 * k + r)] = o[k][0];
      o_odd[merge_col(2 * t + 1, 16 * k + r)] = o[k][1];
      o_even[merge_col(2 * t, 16 * k + r + 8)] = o[k][2];
      o_odd[merge_col(2 * t + 1, 16 * k + r + 8)] = o[k][3];
    }
  } else {  // dims 2r and 2r + 1 of a step are adjacent: one float2 per head
#pragma unroll
    for (int k = 0; k < kSteps; ++k) {
      *reinterpret_cast<float2*>(o_even + merge_col(2 * t, 16 * k + 2 * r)) =
          make_float2(o[k][0], o[k][2]);
      *reinterpret_cast<float2*>(o_odd + merge_col(2 * t + 1, 16 * k + 2 * r)) =
          make_float2(o[k][1], o[k][3]);
    }
  }
  if (r == 0) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      s_m[warp * kRows + 2 * t + c] = m[c];
      s_l[warp * kRows + 2 * t + c] = l[c];
    }
  }
  sync();
  // Once per query head (not per output column): the warps' factors 2^(m_w - max) * v_scale / l
  // with l = sum_w 2^(m_w - max) l_w (0 where no key counted), and the log-sum-exp of a split.
  float* s_f = s_l + kWarps * kRows;    // [kRows, warps]
  float* s_lse = s_f + kRows * kWarps;  // [kRows]
  if (const int h = threadIdx.x % kIssuers; h < num_heads) {
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, s_m[w * kRows + h]);
    float sum_l = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float f = mx != -INFINITY ? exp2f(s_m[w * kRows + h] - mx) : 0.0f;
      s_f[h * kWarps + w] = f;
      sum_l += f * s_l[w * kRows + h];
    }
    const float scale = sum_l > 0.0f ? v_scale / sum_l : 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s_f[h * kWarps + w] *= scale;
    s_lse[h] = sum_l > 0.0f ? mx + __log2f(sum_l) : -INFINITY;
  }
  sync();
  // Two adjacent columns per thread and step: float2 reads, one bf16x2 (or float2) store.
#pragma unroll 1
  for (int i = threadIdx.x % kIssuers; i < num_heads * (kHeadDim / 2); i += kIssuers) {
    const int h = i / (kHeadDim / 2), d = 2 * (i % (kHeadDim / 2));
    float2 out = make_float2(0.0f, 0.0f);
    if (s_lse[h] != -INFINITY) {  // no key counted: 0, whatever the warps' o hold
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float fw = s_f[h * kWarps + w];
        const float2 x =
            *reinterpret_cast<const float2*>(s_o + (w * kRows + h) * kHeadDim + merge_col(h, d));
        out.x += fw * x.x;
        out.y += fw * x.y;
      }
    }
    const int head = head0 + h;
    if (a.num_splits == 1) {
      *reinterpret_cast<uint32_t*>(a.o + (q_token * a.num_q_heads + head) * kHeadDim + d) =
          pack_bf16x2(out.x, out.y);
    } else if (part != nullptr && cluster_ctas() > 1) {
      *reinterpret_cast<float2*>(part + h * kHeadDim + d) = out;
      if (d == 0) part[kRows * kHeadDim + h] = s_lse[h];
    } else {
      const int64_t row = (static_cast<int64_t>(b) * a.num_q_heads + head) * a.num_splits + split;
      *reinterpret_cast<float2*>(a.ws_o + row * kHeadDim + d) = out;
      if (d == 0) a.ws_lse[row] = s_lse[h];
    }
  }
}

}  // namespace decode_mma

template <KvScheme kScheme, int kHeadDim>
__global__ void __launch_bounds__(decode_mma::Shape<kScheme, kHeadDim>::kThreads,
                                  decode_mma::Shape<kScheme, kHeadDim>::kMinBlocks)
    decode_mma_kernel(const __grid_constant__ DecodeArgs a) {
  using namespace decode_mma;
  using Sh = Shape<kScheme, kHeadDim>;
  constexpr int kSteps = Sh::kSteps;
  extern __shared__ __align__(1024) uint8_t smem[];  // whole swizzle patterns (tile_row_bases)

#ifdef FP8KV_DECODE_TIMELINE
  // Diagnostic build (CMake FP8KV_DECODE_TIMELINE): the CTA's start, first tile landed, last
  // tile computed, end and SM, written at the end when a.timeline is set (bench kernels prints
  // them).
  const uint64_t tl_start = global_timer_ns();
  uint64_t tl_first = 0, tl_streamed = 0, tl_issued = 0, tl_row = 0, tl_bar = 0, tl_issue0 = 0;
#endif
  const int split = blockIdx.x;
  const int g0 = blockIdx.y / a.head_chunks * Sh::kKv;  // first KV head of the CTA
  const int hc = blockIdx.y % a.head_chunks;
  const int b = a.request_order != nullptr ? a.request_order[blockIdx.z] : blockIdx.z;
  if (b < 0 || b >= a.num_requests) {  // only an order's entry can be (the same for every thread)
    if (threadIdx.x == 0) {
      record_device_error(a.error, DeviceErrorKind::kDecodeOrder, blockIdx.z, b, a.num_requests);
    }
    return;
  }
  // Warps 4s..4s+3 compute KV head g = g0 + s (a CTA past the last head computes nothing).
  const int sub = threadIdx.x / kIssuers, warp = threadIdx.x / 32 % kWarps, lane = threadIdx.x % 32;
  const int kv_here = min(Sh::kKv, a.num_kv_heads - g0);
  const int g = min(g0 + sub, a.num_kv_heads - 1);
  const int r = lane / 4, t = lane % 4;  // fragment row and column pair (lane = 4r + t)
  const int seq_len = a.seq_len[b];
  const int t_begin = split * a.split_tokens;
  const int t_end = min(seq_len, t_begin + a.split_tokens);
  const int64_t q_token = a.cu_seqlens_q[b];
  const int head0 = g * a.group + hc * kRows;  // first query head of this CTA
  const int num_heads = sub < kv_here ? min(kRows, a.group - hc * kRows) : 0;

  // Online softmax state of query heads 2t and 2t+1 (the 8 lanes of a t hold the same m; l is
  // per lane until the end).
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  // O^T of each 16-dim step k: o[k][0], o[k][2] = head 2t at dims lo(k), hi(k); o[k][1], o[k][3]
  // = head 2t+1 at the same dims. FP8 caches: lo = 16k+2r, hi = lo+1 (the byte permute below);
  // bf16: lo = 16k+r, hi = lo+8 (the plain C fragment).
  float o[kSteps][4];
#pragma unroll
  for (int k = 0; k < kSteps; ++k) o[k][0] = o[k][1] = o[k][2] = o[k][3] = 0.0f;

  const int num_tiles = t_begin < t_end ? ceil_div(t_end - t_begin, kTileTokens) : 0;
  const int32_t* slot_row = request_row<DeviceErrorKind::kDecodeRequest>(a, b);
  // The same for every thread of the CTA: before any barrier. And the same for every split of
  // the request: no CTA of its groups arrives at the split counters, which stay zero.
  if (slot_row == nullptr) return;
#ifdef FP8KV_DECODE_TIMELINE
  tl_row = global_timer_ns();
#endif
  // Thread tid < 128 copies row tid % 64 of the tile, of K for tid < 64 and of V otherwise: the
  // CTA's kKv adjacent heads of one slot (the copy engine, not the thread's load slots: more
  // bytes in flight per SM; several heads per copy: fewer, larger copies). A warp whose 32 rows
  // sit in consecutive slots copies them as one box instead (its lane 0), as a paged pool stores
  // a request: a warp issues its lanes' copies one after another, a box is one copy. At two KV
  // heads thread tid + 128 holds tid's row too and issues half of its warp's one-row copies.
  constexpr bool kSpread = Sh::kThreads == 2 * kIssuers;
  const bool issuer = kSpread || threadIdx.x < kIssuers;
  const int cp_row = threadIdx.x % kTileTokens, cp_v = threadIdx.x % kIssuers / kTileTokens;
  const int map_y = g0 * Sh::kRowBytes / 128;  // the CTA's first line of a slot's K (V) row
  const CUtensorMap* box_map = cp_v ? &a.kv_maps.v_box : &a.kv_maps.k_box;
  const CUtensorMap* row_map = cp_v ? &a.kv_maps.v_row : &a.kv_maps.k_row;
  const uint32_t smem_base = smem_addr(smem);
  const uint32_t bar_base = smem_base + Sh::kDataBytes;  // kStages mbarriers
  // K/V rows are read once: evict them from L2 first, so that the slot table, Q and the other
  // small inputs stay there (measured: 1-2% faster FP8 decode, most at B=512 L=512, GQA 7 and
  // scattered slots).
  const uint64_t l2_policy = l2_evict_first_policy();
  if (threadIdx.x < Sh::kStages) {
    mbarrier_init(bar_base + 8 * threadIdx.x, kSpread ? 2 * kIssuers : kIssuers);
  }
  fence_barrier_init();
  __syncthreads();
#ifdef FP8KV_DECODE_TIMELINE
  tl_bar = global_timer_ns();
#endif
  // The gather path (DecodeArgs::gather_rows): FP8 at head_dim 128, whose 256-byte rows a
  // half-warp copies in one step (bf16's 512-byte rows measured 15-19% slower gathered).
  constexpr bool kGather = kHeadDim == 128 && !Sh::kBf16;
  const int64_t gather_slot_bytes = 2 * static_cast<int64_t>(a.num_kv_heads) * Sh::kRowBytes;
  // This thread's rows' first byte in slot 0 (K or V, the CTA's first head): one pointer, not an
  // array indexed by cp_v (which ptxas put on the stack).
  const uint8_t* const gather_src =
      a.kv + ((cp_v ? a.num_kv_heads : 0) + g0) * static_cast<int64_t>(Sh::kRowBytes);
  const int gather_valid = min(Sh::kCopyBytes, (a.num_kv_heads - g0) * Sh::kRowBytes);
  int slot = -1;  // slot of this thread's row in the next tile to issue (-1: past the end)
  auto load_slot = [&](int i) {
    const int tok = t_begin + i * kTileTokens + cp_row;
    slot = (i < num_tiles && tok < t_end) ? slot_row[tok] : -1;
  };
  auto issue = [&](int i) {
    if (!issuer) return;
    const int stage = i % Sh::kStages;
    const uint32_t dst =
        smem_base + stage * Sh::kStageBytes + (cp_v * kTileTokens + cp_row) * Sh::kCopyBytes;
    const uint32_t bar = bar_base + 8 * stage;
    if constexpr (kGather) {
      const int first = __shfl_sync(kFullMask, slot, 0);
      if (a.gather_rows && !__all_sync(kFullMask, first >= 0 && slot == first + lane)) {
        const bool helper = kSpread && threadIdx.x >= kIssuers;
        gather_warp_rows<Sh::kCopyBytes, kSpread ? 16 : 32>(dst - lane * Sh::kCopyBytes, slot,
                                                            helper ? 16 : 0, gather_src,
                                                            gather_slot_bytes, gather_valid, bar);
        return;
      }
    }
    const bool issued =
        kSpread ? issue_warp_rows_halves<Sh::kCopyBytes>(dst, bar, slot, threadIdx.x >= kIssuers,
                                                         box_map, row_map, map_y, l2_policy)
                : issue_warp_rows<32, Sh::kCopyBytes>(dst, bar, slot, true, box_map, row_map, map_y,
                                                      l2_policy);
    if (!issued) {
      // Rows past the end are zero: their scores are masked and their V rows must be finite
      // zeros, never stale data (0 * NaN would poison the output).
      uint8_t* p = smem + (dst - smem_base);
#pragma unroll
      for (int c = 0; c < Sh::kCopyBytes / 16; ++c) st_v4(p + 16 * c, make_uint4(0u, 0u, 0u, 0u));
      mbarrier_arrive_expect_tx(bar, 0);
    }
  };

  // ldmatrix row addresses: matrix q = lane / 8 covers keys 16 * warp + 8 * (q & 1) + (0..7) and
  // bytes 16 * (q >> 1) .. +15 of a 32-byte column of the rows. FP8: x4 results [0], [1] are key
  // tiles 0, 1 of one 16-byte block, [2], [3] of the next. bf16: [0..3] are the A fragment of a
  // 16-dim k-step (keys r, r+8 x dims 2t.., 2t+8..).
  const int ld_mat = lane / 8;
  uint32_t kw[Sh::kPieces];
  tile_row_bases(smem_base, warp * kWarpKeys + 8 * (ld_mat & 1) + (lane % 8),
                 16 * (ld_mat >> 1) + sub * Sh::kRowBytes, Sh::kCopyBytes, kw);

  // Software pipeline: tiles i+1..i+kStages-1 are in flight while tile i is computed; the slots
  // of the next tile to issue are read one iteration ahead.
#pragma unroll
  for (int i = 0; i < Sh::kStages - 1; ++i) {
    load_slot(i);
    if (i < num_tiles) issue(i);
#ifdef FP8KV_DECODE_TIMELINE
    if (i == 0) tl_issue0 = global_timer_ns();
#endif
  }
  load_slot(Sh::kStages - 1);
#ifdef FP8KV_DECODE_TIMELINE
  tl_issued = global_timer_ns();
#endif
  // Q and the scales after the first copies are issued: their loads' latency overlaps the
  // copies' instead of delaying them (the prologue is paid once per CTA).
  uint32_t qa[kSteps][2];
  float mult, v_scale;
  load_q<kScheme, kHeadDim>(a, q_token, b, g, head0, num_heads, r, t, qa, mult, v_scale);
  for (int i = 0; i < num_tiles; ++i) {
    mbarrier_wait(bar_base + 8 * (i % Sh::kStages), (i / Sh::kStages) & 1);
#ifdef FP8KV_DECODE_TIMELINE
    if (i == 0) tl_first = global_timer_ns();
#endif
    // Every warp is done with tile i-1, whose stage the issue below refills.
    __syncthreads();
    const int j = i + Sh::kStages - 1;
    if (j < num_tiles) issue(j);
    load_slot(j + 1);

    uint32_t stage_w[Sh::kPieces];
#pragma unroll
    for (int p = 0; p < Sh::kPieces; ++p) stage_w[p] = kw[p] + (i % Sh::kStages) * Sh::kStageBytes;
    tile_step<kScheme, kHeadDim, Sh::kPieces, Sh::kVOffset>(
        stage_w, qa, mult, t_begin + i * kTileTokens + warp * kWarpKeys, t_end, r, m, l, o);
  }

#ifdef FP8KV_DECODE_TIMELINE
  tl_streamed = global_timer_ns();
#endif
  // A cluster launch (the group's splits, decode.cu) keeps the partials in shared memory. From
  // here on the request is blockIdx.z's: only split launches read it (their partials' rows and
  // counters), and a split launch takes no order; the register that held b is free.
  merge_warps_and_store<Sh, kHeadDim>(
      a, smem + sub * (Sh::kMergeBytes / Sh::kKv), [] { __syncthreads(); }, warp, r, t, num_heads,
      head0, q_token, static_cast<int>(blockIdx.z), split, m, l, o, v_scale,
      reinterpret_cast<float*>(smem + Sh::kPartialOffset) + sub * Sh::kPartialFloats);
  if (a.num_splits > 1 && cluster_ctas() > 1) {
    decode_mma::merge_group_in_cluster<Sh, kHeadDim>(a, smem, q_token);
  } else if (a.num_splits > 1) {
    // Arrive at the group's counter once every thread's partials are written: the barrier orders
    // them before thread 0's arrival, whose release (acq_rel atomic at GPU scope, cumulative over
    // the barrier) publishes them; the CTA that completes the count merges, its thread 0's acquire
    // and the barrier after it ordering the other CTAs' partials before the merge's reads (CUDA's
    // grid-sync pattern: no fence in every thread). The first barrier also ends every thread's
    // reads of the in-CTA merge's shared memory, which the split merge reuses.
    //
    // More than kDecodeTwoLevelMergeAbove splits merge in two levels, so that one CTA does not
    // read every split's partial while the GPU idles: the last CTA of each sub-group of
    // kDecodeMergeFanIn adjacent splits merges them into the sub-group's first partial, then
    // arrives at the group's counter, whose last arrival merges the sub-groups' partials. Fixed
    // sub-groups and orders: the bits still do not depend on which CTA arrives when.
    __syncthreads();
    // One arrival of the CTA on `counter` (which expects `arrivals`): whether it was the last.
    // The last one puts the counter back to zero for the next launch or a graph's replay (none
    // comes again in this launch).
    const auto arrive = [](uint32_t* counter, int arrivals) {
      bool last = false;
      if (threadIdx.x == 0) {
        last = atomic_add_acq_rel_gpu(counter, 1u) == static_cast<uint32_t>(arrivals - 1);
        if (last) *counter = 0u;
      }
      return __syncthreads_or(last);
    };
    const int64_t group = static_cast<int64_t>(blockIdx.z) * gridDim.y + blockIdx.y;
    uint32_t* group_counter = a.split_counters + group;
    if (a.num_splits <= kDecodeTwoLevelMergeAbove) {
      if (arrive(group_counter, a.num_splits)) {
        decode_mma::merge_group_splits<Sh, kHeadDim, true>(a, smem, 0, a.num_splits, 1, q_token);
      }
    } else {
      const int first = split / kDecodeMergeFanIn * kDecodeMergeFanIn;
      const int count = min(kDecodeMergeFanIn, a.num_splits - first);
      uint32_t* sub_counter = a.split_counters + kDecodeMaxSplitGroups +
                              group * kDecodeMergeSubGroups + split / kDecodeMergeFanIn;
      if (arrive(sub_counter, count)) {
        decode_mma::merge_group_splits<Sh, kHeadDim, false>(a, smem, first, count, 1, q_token);
        __syncthreads();  // the sub-group's partial written, the weights' shared memory read
        if (arrive(group_counter, ceil_div(a.num_splits, kDecodeMergeFanIn))) {
          decode_mma::merge_group_splits<Sh, kHeadDim, true>(
              a, smem, 0, ceil_div(a.num_splits, kDecodeMergeFanIn), kDecodeMergeFanIn, q_token);
        }
      }
    }
  }
#ifdef FP8KV_DECODE_TIMELINE
  __syncthreads();
  if (threadIdx.x == 0) {
    const int64_t cta =
        blockIdx.x + static_cast<int64_t>(gridDim.x) * (blockIdx.y + gridDim.y * blockIdx.z);
    decode_mma::write_timeline(a, cta, tl_start, tl_first, tl_streamed, global_timer_ns(), 0,
                               tl_issued, tl_row, tl_bar, tl_issue0);
  }
#endif
}

namespace decode_mma {
// The persistent kernel's shape: a CTA per SM of kKv adjacent KV heads (4 warps each, as
// Shape; decode_persistent_kv_heads: rows of about 512 bytes, 256 for e4m3 at head_dim 128),
// kStages stages of 64 tokens in about 200 KB. Members as Shape's.
template <KvScheme kScheme, int D>
struct PersistentShape : TileShape<kScheme, D, decode_persistent_kv_heads(kScheme, D)> {
  using Base = TileShape<kScheme, D, decode_persistent_kv_heads(kScheme, D)>;
  using Base::kThreads, Base::kMergeBytes;  // kThreads: the consumers
  // A stage: a tile, and room for an item's warps' merge (which runs in its last tile's stage),
  // in whole swizzle patterns.
  static constexpr int kStageBytes = (std::max(Base::kTileBytes, kMergeBytes) + 1023) / 1024 * 1024;
  // Eight producer warps, lanes 0..15 of each issuing one K or V row of every tile: a warp
  // issues its lanes' copies one after another, so 16 copies per warp and tile land a tile
  // in half the time of 32 (lanes 16..31 only follow along).
  static constexpr int kCopyLanes = 16;
  static constexpr int kProducers = 2 * kTileTokens / kCopyLanes * 32;
  static constexpr int kAllThreads = kThreads + kProducers;
  // Registers (setmaxnreg): the launch gives every thread kLaunchRegs (ptxas compiles a kernel
  // that uses setmaxnreg at its launch bound's registers); the producers keep kProducerRegs and
  // the consumers take the rest (kConsumerRegs, at least kLaunchRegs). An increase beyond the
  // launch's allocation would wait for ever.
  static constexpr int kLaunchRegs = 65536 / kAllThreads / 8 * 8;  // 384+ threads: at most 168
  // 48: the producers also build the longest-first order (build_order; 32 spilled there) and
  // choose between a box and a copy a row (40 spilled 4 bytes at head_dim 128).
  static constexpr int kProducerRegs = 48;
  static constexpr int kConsumerPool =
      (kLaunchRegs * kAllThreads - kProducerRegs * kProducers) / kThreads / 8 * 8;
  static constexpr int kConsumerRegs = kConsumerPool > 240 ? 240 : kConsumerPool;
  static constexpr int kStages = 209000 / kStageBytes;
  static constexpr int kHeaderOffset = kStages * kStageBytes;      // int per stage (8 bytes)
  static constexpr int kFullOffset = kHeaderOffset + 8 * kStages;  // mbarrier per stage
  static constexpr int kEmptyOffset = kFullOffset + 8 * kStages;   // mbarrier per stage
  static constexpr int kItemOffset = kEmptyOffset + 8 * kStages;   // the producers' next item
  // The producers' longest-first order of the requests whose items all come after the first
  // round (build_order in the kernel): bucket counts and cursors, each warp's count per bucket,
  // then, in what is left of the SM's shared memory, the order (uint16) and each request's bucket
  // (uint8). kItemOffset + 4: whether the order was built (0: index order).
  static constexpr int kOrderBuckets = kDecodeOrderBuckets;
  static constexpr int kSortOffset = kItemOffset + 16;
  static constexpr int kSortBytes = 2 * kOrderBuckets * 4 + kProducers / 32 * kOrderBuckets * 2;
  static constexpr int kOrderOffset = kSortOffset + kSortBytes;
  static constexpr int kOrderCapacity = (227 * 1024 - kOrderOffset) / 3 / 16 * 16;  // requests
  static constexpr int kKeyOffset = kOrderOffset + 2 * kOrderCapacity;
  static constexpr int kSmemBytes = kKeyOffset + kOrderCapacity;
  static_assert(kStages >= 3 && kOrderCapacity >= 1024 && kSmemBytes <= 227 * 1024,
                "the ring and an order of 1024 requests or more fit one CTA per SM");
  static_assert(kMergeBytes <= kStageBytes, "the warps' merge fits the last tile's stage");
  static_assert(2 * kTileTokens == kProducers / 32 * kCopyLanes,
                "one producer lane per K or V row of a tile");
  static_assert(kThreads % 128 == 0 && kProducers % 128 == 0, "setmaxnreg takes whole warpgroups");
  static_assert(kLaunchRegs <= 248 && kConsumerRegs >= kLaunchRegs &&
                    kProducerRegs <= kLaunchRegs &&
                    kConsumerRegs * kThreads + kProducerRegs * kProducers <=
                        kLaunchRegs * kAllThreads,
                "the register split fits the launch's allocation");
};
}  // namespace decode_mma

// The persistent decode kernel, for unsplit grids of several waves (decode_persistent, decode.cu):
// one CTA per SM takes items (request b, head group y: kKv KV heads and up to 8 query heads of
// each) from a counter in the workspace until none is left. Eight producer warps, the CTA's last
// 256 threads (kProducerRegs each: setmaxnreg gives the rest to the consumers), fetch the items
// (a CTA's first its own index, then longest first: build_order),
// read their slots and issue every tile's copies into the ring (lanes 0..15 of producer warp
// w: rows 16w..16w+15 of the tile's 64 K then 64 V rows, one box or 16 copies per warp and tile,
// which land a tile sooner than the 32 of four warps did; stage s's `full` mbarrier: their 128
// arrivals and the copies' bytes; its header: the item, or -1 at the end), running ahead across
// items while the consumer warps (the first kThreads threads, laid out as in decode_mma_kernel)
// compute, merge an item's warps in its last tile's stage and write the output; every consumer
// thread releases a stage on its `empty` mbarrier. The ring keeps streaming through an item's
// epilogue and the next item's prologue, which one-item CTAs pay at every CTA's edges (docs/
// GPU.md, twenty-third session). An item's bits do not depend on its CTA or its kernel: the same
// tiles, warps and merge as decode_mma_kernel. The last CTA to finish puts the counters back to
// zero for the next launch.
template <KvScheme kScheme, int kHeadDim>
__global__ void __launch_bounds__(decode_mma::PersistentShape<kScheme, kHeadDim>::kAllThreads, 1)
    decode_mma_persistent_kernel(const __grid_constant__ DecodeArgs a) {
  using namespace decode_mma;
  using Sh = PersistentShape<kScheme, kHeadDim>;
  constexpr int kSteps = Sh::kSteps;
  constexpr int kStages = Sh::kStages;
  extern __shared__ __align__(1024) uint8_t smem[];  // whole swizzle patterns (tile_row_bases)
  const uint32_t smem_base = smem_addr(smem);
  int* header = reinterpret_cast<int*>(smem + Sh::kHeaderOffset);
  check_unread_order(a);
  const uint32_t full_bar = smem_base + Sh::kFullOffset, empty_bar = smem_base + Sh::kEmptyOffset;
  if (threadIdx.x < kStages) {
    mbarrier_init(full_bar + 8 * threadIdx.x, 2 * kTileTokens);  // one arrival per row
    mbarrier_init(empty_bar + 8 * threadIdx.x, Sh::kThreads);    // every consumer thread
  }
  fence_barrier_init();
  __syncthreads();
  const int items_y = ceil_div(a.num_kv_heads, Sh::kKv) * a.head_chunks;  // head groups a request
  const int lane = threadIdx.x % 32;

  if (threadIdx.x >= Sh::kThreads) {  // the producers
    regs_decrease<Sh::kProducerRegs>();
    const int p = threadIdx.x - Sh::kThreads;
    const bool copier = lane < Sh::kCopyLanes;
    const int cp_index = p / 32 * Sh::kCopyLanes + lane % Sh::kCopyLanes;  // row of the tile's 128
    const int cp_row = cp_index % kTileTokens, cp_v = cp_index / kTileTokens;
    int* next_item = reinterpret_cast<int*>(smem + Sh::kItemOffset);
    const uint64_t l2_policy = l2_evict_first_policy();
    const CUtensorMap* box_map = cp_v ? &a.kv_maps.v_box : &a.kv_maps.k_box;
    const CUtensorMap* row_map = cp_v ? &a.kv_maps.v_row : &a.kv_maps.k_row;
    int item = 0, g0 = 0, t_end = 0, num_tiles = 0;
    const int32_t* slot_row = nullptr;
    // The next item (thread 0 of the producers takes it from the counter; named barrier 2 hands it
    // to the others): its request's slot row and tiles (none for an empty or refused request: one
    // header-only stage then). request_row records a refusal from thread 0 only: a consumer's.
    // Longest first: a CTA's first item is its own index (every launch has more items than CTAs).
    // The counter then deals the later items: first those of the request that the first round cut
    // (`rem` of them), then request by request in an order by tiles, descending, so that a batch
    // of mixed lengths does not end on a long item dealt last (docs/GPU.md, twenty-seventh and
    // twenty-eighth sessions). Every CTA builds the same order of requests (a stable counting
    // sort, build_order) while its first item streams: in the producers' first wait for a free
    // stage (the ring full, the consumers on its first tile: time the producers would idle), or
    // at the first later fetch if that comes sooner; when one bucket holds them all (a batch of
    // one length) the order is the index order and no sort runs. An item's bits do not depend on
    // when it runs. Beyond kOrderCapacity requests: index order. (Derived where used rather than
    // kept live through the loop: the producers' registers.)
    const auto first_full = [&] { return ceil_div(static_cast<int>(gridDim.x), items_y); };
    const auto sorted_requests = [&] { return a.num_items / items_y - first_full(); };
    uint16_t* const order = reinterpret_cast<uint16_t*>(smem + Sh::kOrderOffset);
    int* const ordered = reinterpret_cast<int*>(smem + Sh::kItemOffset + 4);
    bool order_built = false;
    // 8 buckets an octave of a request's tiles (decode_order_key; 0: none).
    const auto request_key = [&](int b) {
      const int32_t req = a.req_index[b];
      return decode_order_key(req >= 0 && req < a.max_requests
                                  ? ceil_div(min(a.seq_len[b], a.split_tokens), kTileTokens)
                                  : 0);
    };
    const auto build_order = [&] {
      constexpr int kBuckets = Sh::kOrderBuckets, kWarpsP = Sh::kProducers / 32;
      uint32_t* count = reinterpret_cast<uint32_t*>(smem + Sh::kSortOffset);  // [kBuckets]
      uint32_t* cursor = count + kBuckets;                                    // [kBuckets]
      uint16_t* warp_count = reinterpret_cast<uint16_t*>(cursor + kBuckets);  // [warps, kBuckets]
      uint8_t* key = smem + Sh::kKeyOffset;                                   // [requests]
      const int n = sorted_requests();
      if (n <= 1 || n > Sh::kOrderCapacity) {
        if (p == 0) *ordered = 0;
        return;  // the caller's barrier publishes the flag
      }
      for (int k = p; k < kBuckets; k += Sh::kProducers) count[k] = 0;
      for (int k = p; k < kWarpsP * kBuckets; k += Sh::kProducers) warp_count[k] = 0;
      named_barrier_sync(2, Sh::kProducers);
      for (int q = p; q < n; q += Sh::kProducers) {
        const int k = request_key(first_full() + q);
        key[q] = static_cast<uint8_t>(k);
        atomicAdd(&count[k], 1u);
      }
      named_barrier_sync(2, Sh::kProducers);
      // cursor[k]: the requests in buckets above k (descending), by warp 0: lane l sums buckets
      // 255 - 8l .. 248 - 8l, then an exclusive scan over the lanes; and whether one bucket holds
      // every request.
      if (p < 32) {
        static_assert(kBuckets == 256, "8 buckets a lane");
        uint32_t sum = 0;
        bool all_in_one = false;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const uint32_t c = count[kBuckets - 1 - 8 * p - i];
          sum += c;
          all_in_one |= c == static_cast<uint32_t>(n);
        }
        uint32_t before = sum;
#pragma unroll
        for (int d = 1; d < 32; d *= 2) {
          const uint32_t x = __shfl_up_sync(kFullMask, before, d);
          if (p >= d) before += x;
        }
        before -= sum;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const int k = kBuckets - 1 - 8 * p - i;
          cursor[k] = before;
          before += count[k];
        }
        all_in_one = __any_sync(kFullMask, all_in_one);
        if (p == 0) *ordered = all_in_one ? 0 : 1;
      }
      named_barrier_sync(2, Sh::kProducers);
      if (*ordered == 0) return;
      // Stable: within a bucket, requests keep their index order (chunks of kProducers in turn;
      // within one, lanes of a warp by rank, warps by their counts).
      const uint32_t lanes_below = (1u << lane) - 1u;
      const int warp_p = p / 32;
      for (int base = 0; base < n; base += Sh::kProducers) {
        const int q = base + p;
        const bool valid = q < n;
        const int k = valid ? key[q] : kBuckets;
        const uint32_t same = __match_any_sync(kFullMask, k);
        const bool leader = (same & lanes_below) == 0;
        if (valid && leader) warp_count[warp_p * kBuckets + k] = __popc(same);
        named_barrier_sync(2, Sh::kProducers);
        if (valid) {
          uint32_t pos = cursor[k] + __popc(same & lanes_below);
          for (int w = 0; w < warp_p; ++w) pos += warp_count[w * kBuckets + k];
          order[pos] = static_cast<uint16_t>(q);
        }
        named_barrier_sync(2, Sh::kProducers);  // every position read the cursors
        if (valid && leader) {
          atomicAdd(&cursor[k], static_cast<uint32_t>(__popc(same)));
          warp_count[warp_p * kBuckets + k] = 0;
        }
        named_barrier_sync(2, Sh::kProducers);
      }
    };
    const auto ensure_order = [&] {
      if (order_built) return;
      build_order();
      named_barrier_sync(2, Sh::kProducers);  // the order and its flag
      order_built = true;
    };
    auto fetch = [&](bool first) {
      if (first) {
        if (p == 0) *next_item = static_cast<int>(blockIdx.x);
      } else {
        ensure_order();
        if (p == 0) {
          const int c = static_cast<int>(atomicAdd(a.split_counters, 1u));
          const int rem = first_full() * items_y - static_cast<int>(gridDim.x);
          int next = a.num_items;
          if (c < rem) {
            next = static_cast<int>(gridDim.x) + c;
          } else if (c < a.num_items - static_cast<int>(gridDim.x)) {
            const int r = (c - rem) / items_y, y = (c - rem) % items_y;
            next = (first_full() + (*ordered ? order[r] : r)) * items_y + y;
          }
          *next_item = next;
        }
      }
      named_barrier_sync(2, Sh::kProducers);
      item = *next_item;
      named_barrier_sync(2, Sh::kProducers);  // read by all before the next write
      num_tiles = 0;
      if (item >= a.num_items) return;
      const int b = item / items_y;
      g0 = item % items_y / a.head_chunks * Sh::kKv;
      slot_row = request_row<DeviceErrorKind::kDecodeRequest>(a, b);
      t_end = min(a.seq_len[b], a.split_tokens);
      if (slot_row != nullptr && t_end > 0) num_tiles = ceil_div(t_end, kTileTokens);
    };
    // The slot of this thread's row of tile i (-1: past the end), read a stage ahead.
    int slot = -1;
    auto load_slot = [&](int i) {
      const int tok = i * kTileTokens + cp_row;
      slot = copier && i < num_tiles && tok < t_end ? slot_row[tok] : -1;
    };
    fetch(true);
    load_slot(0);
    for (uint32_t J = 0, i = 0;; ++J) {  // J: stage uses; i: the item's tile
      const int s = J % kStages;
      if (J >= kStages) {
        if (J == kStages) ensure_order();  // the ring is full: the producers' first idle wait
        mbarrier_wait(empty_bar + 8 * s, (J / kStages - 1) & 1);
      }
      const bool end = item >= a.num_items;
      if (p == 0) header[s] = end ? -1 : item;
      const uint32_t bar = full_bar + 8 * s;
      const uint32_t dst =
          smem_base + s * Sh::kStageBytes + (cp_v * kTileTokens + cp_row) * Sh::kCopyBytes;
      if (!issue_warp_rows<Sh::kCopyLanes, Sh::kCopyBytes>(dst, bar, slot, copier, box_map, row_map,
                                                           g0 * Sh::kRowBytes / 128, l2_policy)) {
        if (static_cast<int>(i) < num_tiles) {
          // Rows past the end are zero: their scores are masked and their V rows must be finite
          // zeros, never stale data (0 * NaN would poison the output).
          uint8_t* row = smem + (dst - smem_base);
#pragma unroll
          for (int c = 0; c < Sh::kCopyBytes / 16; ++c) {
            st_v4(row + 16 * c, make_uint4(0u, 0u, 0u, 0u));
          }
          fence_proxy_async();  // before later tensor copies into this row
        }
        mbarrier_arrive(bar);
      }
      if (end) break;
      if (static_cast<int>(++i) < max(num_tiles, 1)) {
        load_slot(i);
      } else {
        fetch(false);  // its latency overlaps the wait for the next free stage
        i = 0;
        load_slot(0);
      }
    }
    // Every CTA has fetched past the end before it counts itself out: the last one out resets.
    if (p == 0) {
      __threadfence();
      if (atomicAdd(a.split_counters + 1, 1u) == gridDim.x - 1) {
        a.split_counters[0] = 0u;
        a.split_counters[1] = 0u;
      }
    }
    return;
  }

  // The consumers: warps 4s..4s+3 compute KV head g0 + s of each item, as in decode_mma_kernel.
  if constexpr (Sh::kConsumerRegs > Sh::kLaunchRegs) regs_increase<Sh::kConsumerRegs>();
  const int sub = threadIdx.x / kIssuers, warp = threadIdx.x / 32 % kWarps;
  const int r = lane / 4, t = lane % 4;
  const int ld_mat = lane / 8;
  uint32_t kw[Sh::kPieces];
  tile_row_bases(smem_base, warp * kWarpKeys + 8 * (ld_mat & 1) + (lane % 8),
                 16 * (ld_mat >> 1) + sub * Sh::kRowBytes, Sh::kCopyBytes, kw);
  const auto consumers_sync = [] { named_barrier_sync(1, Sh::kThreads); };
#ifdef FP8KV_DECODE_TIMELINE
  // Diagnostic build: per item (entry `item`) its first stage landed, its last tile computed, its
  // output written, the CTA and the SM (type 1); per CTA (entry num_items + CTA) the consumers'
  // start, the first stage landed and their end (type 2). Thread 0 writes them.
  const uint64_t tl_start = global_timer_ns();
  uint64_t tl_cta_first = 0;
#endif
  for (uint32_t J = 0;;) {
    int s = J % kStages;
    mbarrier_wait(full_bar + 8 * s, (J / kStages) & 1);
#ifdef FP8KV_DECODE_TIMELINE
    const uint64_t tl_first = global_timer_ns();
    if (tl_cta_first == 0) tl_cta_first = tl_first;
#endif
    const int item = header[s];
    if (item < 0) break;
    const int b = item / items_y, y = item % items_y;
    const int g0 = y / a.head_chunks * Sh::kKv, hc = y % a.head_chunks;
    const int kv_here = min(Sh::kKv, a.num_kv_heads - g0);
    const int g = min(g0 + sub, a.num_kv_heads - 1);
    const int t_end = min(a.seq_len[b], a.split_tokens);
    const int64_t q_token = a.cu_seqlens_q[b];
    const int head0 = g * a.group + hc * kRows;
    const int num_heads = sub < kv_here ? min(kRows, a.group - hc * kRows) : 0;
    const int32_t* slot_row = request_row<DeviceErrorKind::kDecodeRequest>(a, b);
    const int num_tiles = slot_row != nullptr && t_end > 0 ? ceil_div(t_end, kTileTokens) : 0;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    float o[kSteps][4];
#pragma unroll
    for (int k = 0; k < kSteps; ++k) o[k][0] = o[k][1] = o[k][2] = o[k][3] = 0.0f;
    uint32_t qa[kSteps][2];
    float mult = 0.0f, v_scale = 0.0f;
    if (slot_row != nullptr)
      load_q<kScheme, kHeadDim>(a, q_token, b, g, head0, num_heads, r, t, qa, mult, v_scale);
    for (int i = 0; i < num_tiles; ++i) {
      if (i > 0) {
        s = J % kStages;
        mbarrier_wait(full_bar + 8 * s, (J / kStages) & 1);
      }
      uint32_t stage_w[Sh::kPieces];
#pragma unroll
      for (int p = 0; p < Sh::kPieces; ++p) stage_w[p] = kw[p] + s * Sh::kStageBytes;
      tile_step<kScheme, kHeadDim, Sh::kPieces, Sh::kVOffset>(
          stage_w, qa, mult, i * kTileTokens + warp * kWarpKeys, t_end, r, m, l, o);
      // Every consumer thread releases its own reads of the stage (an arrival releases only the
      // arriving thread's accesses). The item's last stage stays for the merge.
      if (i + 1 < num_tiles) {
        mbarrier_arrive(empty_bar + 8 * s);
        ++J;
      }
    }
#ifdef FP8KV_DECODE_TIMELINE
    const uint64_t tl_streamed = global_timer_ns();
#endif
    // Stage s holds the item's last tile (or its header alone): the warps' merge goes there.
    // A refused request writes nothing (as decode_mma_kernel).
    if (slot_row != nullptr) {
      merge_warps_and_store<Sh, kHeadDim>(
          a, smem + s * Sh::kStageBytes + sub * (Sh::kMergeBytes / Sh::kKv), consumers_sync, warp,
          r, t, num_heads, head0, q_token, b, 0, m, l, o, v_scale);
    }
    fence_proxy_async();  // the merge's stores before the tensor copies that refill the stage
    consumers_sync();     // every consumer is done with the stage
#ifdef FP8KV_DECODE_TIMELINE
    if (threadIdx.x == 0)
      write_timeline(a, item, tl_first, tl_streamed, global_timer_ns(), blockIdx.x, 1);
#endif
    mbarrier_arrive(empty_bar + 8 * s);
    ++J;
  }
#ifdef FP8KV_DECODE_TIMELINE
  if (threadIdx.x == 0) {
    write_timeline(a, static_cast<int64_t>(a.num_items) + blockIdx.x, tl_start, tl_cta_first, 0,
                   global_timer_ns(), 2);
  }
#endif
}

namespace decode_mma {
// CTAs of `kernel` an SM holds at `threads` and `smem_bytes` of dynamic shared memory, after
// allowing the kernel that much (each caller keeps the answer in a function-local static).
template <class Kernel>
int resident_per_sm(Kernel* kernel, int threads, int smem_bytes) {
  FP8KV_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
  int v = 0;
  FP8KV_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&v, kernel, threads, smem_bytes));
  return v;
}
}  // namespace decode_mma

template <KvScheme kScheme, int kHeadDim>
int DecodeMmaKernel<kScheme, kHeadDim>::ctas_per_sm() {
  using Sh = decode_mma::Shape<kScheme, kHeadDim>;
  static const int n = std::max(1, decode_mma::resident_per_sm(decode_mma_kernel<kScheme, kHeadDim>,
                                                               Sh::kThreads, Sh::kSmemBytes));
  return n;
}

namespace decode_mma {
// `a` with the cache's tensor maps (DecodeKvMaps) for a kernel whose CTAs or items take Sh::kKv
// adjacent heads and whose warps box `rows` rows of a tile: lines of 128 bytes, a slot's K (V)
// heads' ceil(Hkv * kRowBytes / 128) lines, boxes of kCopyBytes / 128 lines (a CTA of fewer
// heads at the end reads the lines past its heads: zeros past the tensor, or the next V
// head's line at 64-byte rows, neither computed).
template <class Sh>
DecodeArgs with_kv_maps(const DecodeArgs& a, int rows) {
  DecodeArgs m = a;
  const uint64_t kv_bytes = static_cast<uint64_t>(a.num_kv_heads) * Sh::kRowBytes;  // K or V
  const uint64_t dims[3] = {32, (kv_bytes + 127) / 128, static_cast<uint64_t>(a.cache_slots)};
  const uint64_t strides[2] = {128, 2 * kv_bytes};
  const uint32_t box_rows[3] = {32, Sh::kCopyBytes / 128, static_cast<uint32_t>(rows)};
  const uint32_t one_row[3] = {32, Sh::kCopyBytes / 128, 1};
  if (!encode_tma_3d_u32_sw128(&m.kv_maps.k_box, a.kv, dims, strides, box_rows) ||
      !encode_tma_3d_u32_sw128(&m.kv_maps.v_box, a.kv + kv_bytes, dims, strides, box_rows) ||
      !encode_tma_3d_u32_sw128(&m.kv_maps.k_row, a.kv, dims, strides, one_row) ||
      !encode_tma_3d_u32_sw128(&m.kv_maps.v_row, a.kv + kv_bytes, dims, strides, one_row)) {
    throw Error(
        "decode attention: the driver could not describe the KV cache to the copy engine "
        "(cuTensorMapEncodeTiled: " +
        std::to_string(a.cache_slots) + " slots of " + std::to_string(2 * kv_bytes) + " bytes)");
  }
  return m;
}
}  // namespace decode_mma

// Whether a split launch of `grid` can merge its groups in clusters (merge_group_in_cluster): 2 to
// kDecodeClusterMergeMaxSplits splits, and every CTA of the grid resident at once as clusters (one
// wave: a CTA waiting at the cluster's barrier holds its SM's room, which a later wave would want).
template <KvScheme kScheme, int kHeadDim>
bool DecodeMmaKernel<kScheme, kHeadDim>::cluster_merge(dim3 grid) {
  using Sh = decode_mma::Shape<kScheme, kHeadDim>;
  constexpr int kMax = kDecodeClusterMergeMaxSplits;
  const int splits = static_cast<int>(grid.x);
  if (splits < 2 || splits > kMax) return false;
  // Clusters of each size the GPU holds at once (0: that size cannot run), asked once.
  static const std::array<int, kMax + 1> active = [] {
    ctas_per_sm();  // sets the shared-memory limit first
    std::array<int, kMax + 1> n{};
    for (int k = 2; k <= kMax; ++k) {
      const OneAttributeLaunch c(dim3(k), Sh::kThreads, Sh::kSmemBytes, nullptr,
                                 OneAttributeLaunch::ClusterDims{k});
      if (cudaOccupancyMaxActiveClusters(&n[k], decode_mma_kernel<kScheme, kHeadDim>, &c.config) !=
          cudaSuccess) {
        (void)cudaGetLastError();  // not sticky: the counter merge then
        n[k] = 0;
      }
    }
    return n;
  }();
  const int64_t ctas = static_cast<int64_t>(grid.x) * grid.y * grid.z;
  return ctas <= static_cast<int64_t>(active[splits]) * splits;
}

template <KvScheme kScheme, int kHeadDim>
void DecodeMmaKernel<kScheme, kHeadDim>::launch(const DecodeArgs& a, dim3 grid, bool cluster,
                                                cudaStream_t stream) {
  using Sh = decode_mma::Shape<kScheme, kHeadDim>;
  ctas_per_sm();  // sets the shared-memory limit once
  if (cluster) {
    const OneAttributeLaunch c(grid, Sh::kThreads, Sh::kSmemBytes, stream,
                               OneAttributeLaunch::ClusterDims{static_cast<int>(grid.x)});
    FP8KV_CUDA_CHECK(cudaLaunchKernelEx(&c.config, decode_mma_kernel<kScheme, kHeadDim>,
                                        decode_mma::with_kv_maps<Sh>(a, 32)));
  } else {
    decode_mma_kernel<kScheme, kHeadDim>
        <<<grid, Sh::kThreads, Sh::kSmemBytes, stream>>>(decode_mma::with_kv_maps<Sh>(a, 32));
  }
  FP8KV_CUDA_CHECK_LAUNCH("decode_mma_kernel");
}

template <KvScheme kScheme, int kHeadDim>
int DecodeMmaKernel<kScheme, kHeadDim>::persistent_ctas_per_sm() {
  using Sh = decode_mma::PersistentShape<kScheme, kHeadDim>;
  // 0 where the GPU cannot hold one (its ring is ~200 KB): decode_persistent then declines.
  static const int n = decode_mma::resident_per_sm(decode_mma_persistent_kernel<kScheme, kHeadDim>,
                                                   Sh::kAllThreads, Sh::kSmemBytes);
  return n;
}

template <KvScheme kScheme, int kHeadDim>
void DecodeMmaKernel<kScheme, kHeadDim>::launch_persistent(const DecodeArgs& a, int ctas,
                                                           cudaStream_t stream) {
  using Sh = decode_mma::PersistentShape<kScheme, kHeadDim>;
  persistent_ctas_per_sm();  // sets the shared-memory limit once
  decode_mma_persistent_kernel<kScheme, kHeadDim>
      <<<ctas, Sh::kAllThreads, Sh::kSmemBytes, stream>>>(
          decode_mma::with_kv_maps<Sh>(a, Sh::kCopyLanes));
  FP8KV_CUDA_CHECK_LAUNCH("decode_mma_persistent_kernel");
}

#define FP8KV_DECODE_MMA_INSTANTIATE(SCHEME)    \
  template struct DecodeMmaKernel<SCHEME, 64>;  \
  template struct DecodeMmaKernel<SCHEME, 128>; \
  template struct DecodeMmaKernel<SCHEME, 256>;

}  // namespace fp8kv::cuda
