// The parts the prefill kernel is built from (FA3 splits them the same way):
//   params      PrefillParams: the shared AttentionArgs (attention_args.h) and the causal flag;
//   scheduler   the work items (query head, request, q tile; the q tiles counted from the last,
//               so that the longest causal rows start first; non-causal, every q tile of a
//               request reads all its keys, and the order does not matter), one CTA each or
//               dealt out to one CTA per SM;
//   seqlen      PrefillSeq: where a CTA's rows sit in its request (varlen, cached prefix) and
//               which keys they see (causal or not);
//   softmax     RowSoftmax: the online softmax in base 2 over MMA accumulator fragments;
//   conversions fast_exp2, the bf16 / f16 / e4m3 packs of P and O, fp8 K/V codes widened to
//               f16;
//   output      the quad transpose of the 16-byte epilogue stores.
// The kernel itself (the mainloop, its loader and its epilogue): prefill_ws.cuh (warp-specialized
// wgmma, every scheme: 8-bit operands for fp8-per-head, 16-bit operands for the others). The
// mma.sync kernel that was built from these parts beside it is retired (issue 10).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "fp8kv/backend.h"
#include "fp8kv/error.h"
#include "fp8kv/scheme.h"
#include "kernels/cuda/attention_args.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/device_error.h"
#include "kernels/cuda/prefill_launch.cuh"

namespace fp8kv::cuda::prefill {

// ---- params ----------------------------------------------------------------------------------

// Device-side arguments: the shared AttentionArgs (attention_args.h) and what only prefill reads.
struct PrefillParams : AttentionArgs {
  bool causal = true;  // AttentionParams::causal
  // The scheduler's items (prefill_item_grid): num_q_heads x num_requests x q_tiles.
  int num_requests = 0;
  int q_tiles = 0;  // tiles of new tokens of the longest request
#ifdef FP8KV_PREFILL_TIMELINE
  uint32_t* timeline = nullptr;  // set_prefill_timeline's buffer (prefill_launch.cuh), or null
#endif
};

#ifdef FP8KV_PREFILL_TIMELINE
uint32_t* prefill_timeline();  // prefill.cu: the buffer set_prefill_timeline set
#endif

inline PrefillParams make_prefill_params(const AttentionParams& a, DeviceError* error) {
  PrefillParams p;
  static_cast<AttentionArgs&>(p) = attention_args(a, error);
  p.causal = a.causal;
#ifdef FP8KV_PREFILL_TIMELINE
  p.timeline = prefill_timeline();
#endif
  return p;
}

// ---- scheduler -------------------------------------------------------------------------------

// ---- seqlen ----------------------------------------------------------------------------------

// A work item's place in its request: `tile_tokens` tokens (rows) per item.
struct PrefillSeq {
  int b = 0;         // request
  int q_begin = 0;   // first row of the request in Q / O
  int q_len = 0;     // new tokens of the request
  int seq_len = 0;   // keys of the request (cached + new)
  int prefix = 0;    // cached tokens: new token i sits at position prefix + i
  int q0 = 0;        // first new token of this item
  int rows = 0;      // valid rows of this item
  int last_pos = 0;  // position of its last token
  int last_key = 0;  // the last key any row of this item sees: key_bound(last_pos)
  bool causal = true;

  // The last key a token at position `pos` sees: pos itself (causal), or the request's last key
  // (non-causal). The kernels load no key tile past the CTA's last_key and mask the keys past
  // a row's bound; non-causal that leaves only the seq_len bound, on the request's last key tile
  // alone, and every q tile costs the same.
  __device__ __forceinline__ int key_bound(int pos) const { return causal ? pos : seq_len - 1; }
};

// Fills `s` for q tile `q_tile` (0: the first tokens) of request b; false when the tile has no
// rows (past its request's new tokens, or an empty request).
__device__ __forceinline__ bool prefill_seq_at(const PrefillParams& p, int b, int q_tile,
                                               int tile_tokens, PrefillSeq& s) {
  s.b = b;
  s.q_begin = p.cu_seqlens_q[s.b];
  s.q_len = p.cu_seqlens_q[s.b + 1] - s.q_begin;
  s.q0 = q_tile * tile_tokens;
  if (s.q0 >= s.q_len) return false;
  s.seq_len = p.seq_len[s.b];
  s.prefix = s.seq_len - s.q_len;
  s.rows = min(tile_tokens, s.q_len - s.q0);
  s.last_pos = s.prefix + s.q0 + (s.rows - 1);
  s.causal = p.causal;
  s.last_key = s.key_bound(s.last_pos);
  return true;
}

// The persistent scheduler. Item i of a launch is query head i % Hq of request (i / Hq) % B, q
// tile (i / Hq / B) counted from the last: the longest causal rows first. False for an item
// without rows.
__device__ __forceinline__ bool prefill_item(const PrefillParams& p, int item, int tile_tokens,
                                             int& head, PrefillSeq& s) {
  head = item % p.num_q_heads;
  const int rest = item / p.num_q_heads;
  return prefill_seq_at(p, rest % p.num_requests, p.q_tiles - 1 - rest / p.num_requests,
                        tile_tokens, s);
}
__device__ __forceinline__ int prefill_items(const PrefillParams& p) {
  return p.num_q_heads * p.num_requests * p.q_tiles;
}
// The CTA's item of round k: rounds of gridDim.x items, dealt out forwards in even rounds and
// backwards in odd ones (a snake), so that the CTA that got a round's longest item gets the next
// round's shortest and, with the items longest first, the CTAs' sums come out even. Every role of
// a CTA walks the same sequence and skips the same empty items.
__device__ __forceinline__ int prefill_round_item(int k) {
  const int c = (k & 1) ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  return k * gridDim.x + c;
}

// Persistent CTAs (even batches, prefill_item_grid) for the kernels that walk items
// (prefill_ws.cuh, kPersistent). Their consumers' ping-pong turns run on across a CTA's items
// (kTurnsRunOn there): warpgroup 1's opening arrival happens once per CTA and warpgroup 0's closing
// synchronization once after its last item. Before that fix (docs/GPU.md, sixteenth and seventeenth
// sessions) each item opened and closed its own turns, and warpgroup 1 could arrive twice on
// warpgroup 0's barrier before warpgroup 0 took the first arrival: a deadlock by PTX's barrier
// semantics (racecheck of PrefillPersistent.SmallestGridForRacecheck did not end in 380 s, most
// likely that hang under the checker's scheduling; with the fix it finishes in 3 s with 0
// hazards). H200, the fix against one CTA per item, same call: bf16 causal B=2 L=8192 584 -> 616
// TFLOP/s, non-causal 597 -> 620, B=16 L=1024 322 -> 391, B=4 L=4096 514 -> 561.
constexpr bool kPrefillPersistentCtas = true;

// The grid of a kernel that walks items of `tile_tokens` new tokens per query head and request (in
// p). Persistent, where every request has the same number of new tokens: one CTA per SM (at most
// one per item), the items dealt out in rounds. Otherwise one CTA per item, and the hardware hands
// them to the SMs as they free up: with requests of mixed lengths (a cached-prefix batch) a fixed
// deal (items c, c + 132, ... without the snake) left some CTAs rounds of long items and others
// rounds of empty ones (H200: 8 requests of 100..2048 new tokens, 1000 cached: 1.2-1.3x the time).
// Throws when the item count exceeds an int.
inline dim3 prefill_item_grid(const AttentionParams& a, int tile_tokens, bool persistent,
                              PrefillParams& p) {
  p.num_requests = a.batch.num_requests;
  p.q_tiles = ceil_div(a.batch.max_q_len, tile_tokens);
  const int64_t items = static_cast<int64_t>(a.num_q_heads) * p.num_requests * p.q_tiles;
  if (items > INT32_MAX) {
    throw Error("prefill_attention: too many tiles (" + std::to_string(items) + ")");
  }
  const int64_t ctas = kPrefillPersistentCtas && persistent && even_batch(a)
                           ? std::min<int64_t>(items, device_sm_count())
                           : items;
  return dim3(static_cast<unsigned>(std::max<int64_t>(1, ctas)));
}

// ---- output ----------------------------------------------------------------------------------

// A 4 x 4 transpose of 32-bit words across the 4 lanes of a quad (q = lane % 4): y[j] of lane q
// is x[q] of lane j. An accumulator row's words (lane q holds columns 2q, 2q + 1 of each n8 tile
// x[j]) become 16 contiguous bytes a lane (lane q: n8 tile q, columns 0..7), so that the epilogue
// writes a row in 16-byte stores, four lanes 64 contiguous bytes, where 4-byte ones made four
// times the L2 requests. Every lane of the warp takes part (the shuffles' full mask).
__device__ __forceinline__ void quad_transpose4(const uint32_t (&x)[4], int q, uint32_t (&y)[4]) {
  // z[j] = x[j ^ q]: then the word lane q ^ d needs is z[d] in every lane, one xor shuffle a d.
  auto xor_order = [q](const uint32_t(&a)[4], uint32_t(&b)[4]) {
    const bool odd = q & 1, high = q & 2;
    const uint32_t c0 = odd ? a[1] : a[0], c1 = odd ? a[0] : a[1];
    const uint32_t c2 = odd ? a[3] : a[2], c3 = odd ? a[2] : a[3];
    b[0] = high ? c2 : c0;
    b[1] = high ? c3 : c1;
    b[2] = high ? c0 : c2;
    b[3] = high ? c1 : c3;
  };
  uint32_t z[4], r[4];
  xor_order(x, z);
  r[0] = z[0];
#pragma unroll
  for (int d = 1; d < 4; ++d) r[d] = __shfl_xor_sync(kFullMask, z[d], d);
  xor_order(r, y);  // y[j] = r[j ^ q], the word of lane j
}

// ---- conversions -----------------------------------------------------------------------------

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// (pack_bf16x2, pack_f16x2: common.cuh.)

// Four floats -> four e4m3 codes, x0 in the low byte; round to nearest even, saturating: the
// same bytes as fp8kv::float_to_e4m3.
__device__ __forceinline__ uint32_t pack_e4m3x4(float x0, float x1, float x2, float x3) {
  uint16_t lo, hi;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;\n" : "=h"(lo) : "f"(x1), "f"(x0));
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;\n" : "=h"(hi) : "f"(x3), "f"(x2));
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}

// Two fp16 pairs -> four e4m3 codes (lo's low half in the low byte, hi's high half in the high
// byte); round to nearest even, saturating.
__device__ __forceinline__ uint32_t pack_e4m3x4_f16(uint32_t lo, uint32_t hi) {
  uint16_t a, b;
  asm("cvt.rn.satfinite.e4m3x2.f16x2 %0, %1;\n" : "=h"(a) : "r"(lo));
  asm("cvt.rn.satfinite.e4m3x2.f16x2 %0, %1;\n" : "=h"(b) : "r"(hi));
  return static_cast<uint32_t>(a) | (static_cast<uint32_t>(b) << 16);
}

// Two e4m3 (e5m2) codes -> f16x2, exactly (both are subsets of f16): one hardware convert (to
// bf16 would take four: to f16, to two floats, to bf16).
template <KvCodec kCodec>
__device__ __forceinline__ uint32_t fp8x2_to_f16x2(uint32_t two_codes) {
  const __half2_raw h =
      __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two_codes),
                                 kCodec == KvCodec::kE5m2 ? __NV_E5M2 : __NV_E4M3);
  return static_cast<uint32_t>(h.x) | (static_cast<uint32_t>(h.y) << 16);
}
// 16 codes (one 16-byte chunk of a K/V row) -> 16 f16 in two 16-byte vectors, in order.
template <KvCodec kCodec>
__device__ __forceinline__ void fp8x16_to_f16(uint4 codes, uint4& lo, uint4& hi) {
  auto cvt = [](uint32_t two_codes) { return fp8x2_to_f16x2<kCodec>(two_codes); };
  lo.x = cvt(codes.x);
  lo.y = cvt(codes.x >> 16);
  lo.z = cvt(codes.y);
  lo.w = cvt(codes.y >> 16);
  hi.x = cvt(codes.z);
  hi.y = cvt(codes.z >> 16);
  hi.z = cvt(codes.w);
  hi.w = cvt(codes.w >> 16);
}

// ---- softmax ---------------------------------------------------------------------------------

// Online softmax in base 2 over kTiles n8 tiles of MMA accumulators (the m16n8 C layout, which
// is also each warp's share of a wgmma m64 accumulator), lane = 4g + t: element 4i + e of the
// flat array is, for e = 0, 1, row g at column 8i + 2t + e, and for e = 2, 3 row g + 8. Scores
// stay raw; the scale, with log2(e) folded in, is applied inside one fma per element:
// p = exp2(s * scale - max * scale). The row sums are this lane's share until finish().
template <int kTiles>
struct RowSoftmax {
  static_assert(kTiles > 0 && ((kTiles & (kTiles - 1)) == 0 || kTiles >= 4),
                "the reduction trees halve min(kTiles, 4) chains");
  float row_max[2] = {-INFINITY, -INFINITY};  // rows g and g + 8, raw score units
  float row_sum[2] = {0.0f, 0.0f};

  // -inf on the keys past each row's last key (row_pos: rows g and g + 8; PrefillSeq::key_bound:
  // causal the row's position, non-causal the request's last key) in the tile at key k0.
  __device__ __forceinline__ static void mask(float (&s)[4 * kTiles], int k0, int t,
                                              const int (&row_pos)[2]) {
#pragma unroll
    for (int i = 0; i < kTiles; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if (k0 + i * 8 + 2 * t + (e & 1) > row_pos[e >> 1]) s[4 * i + e] = -INFINITY;
      }
    }
  }
  // Each row's reduction by `op` of kTiles items (item(i, r): tile i's share of row r): kAcc
  // independent chains, then a tree over them (depth kTiles / kAcc + 2, not kTiles + 1). The row
  // max is on the critical path between the S wgmma and the exponentials (a consumer's softmax
  // measured ~1260 cycles of a ~3000-cycle tile on the H200); chains for it and the row sum:
  // fp8-per-head causal B=2 L=8192 654 -> 663 TFLOP/s, non-causal 684 -> 701 (two A/B device
  // calls, eighth session). Only 4 chains: the consumers sit at their register cap, and a full
  // tree (32 partial maxima live beside S) spilled 140 bytes.
  template <typename T, typename Item, typename Op>
  __device__ __forceinline__ static void chain_tree(Item item, Op op, T (&out)[2]) {
    constexpr int kAcc = kTiles < 4 ? kTiles : 4;
    T acc[2][kAcc];
    // The chains start at the first kAcc items, not at an identity (an FMNMX with -inf or an FADD
    // of 0 per chain, which ptxas keeps: they differ for NaN and -0). H200, causal B=2 L=8192:
    // fp8-per-tensor 403.6 -> 407.6, fp8-per-head 695.5 -> 700.3, bf16 D 256 457.6 -> 467.9.
#pragma unroll
    for (int k = 0; k < kAcc; ++k) {
      acc[0][k] = item(k, 0);
      acc[1][k] = item(k, 1);
    }
#pragma unroll
    for (int i = kAcc; i < kTiles; ++i) {
      acc[0][i % kAcc] = op(acc[0][i % kAcc], item(i, 0));
      acc[1][i % kAcc] = op(acc[1][i % kAcc], item(i, 1));
    }
#pragma unroll
    for (int w = kAcc / 2; w >= 1; w /= 2) {
#pragma unroll
      for (int k = 0; k < w; ++k) {
        acc[0][k] = op(acc[0][k], acc[0][k + w]);
        acc[1][k] = op(acc[1][k], acc[1][k + w]);
      }
    }
    out[0] = acc[0][0];
    out[1] = acc[1][0];
  }
  // The rows' reduction of the scores by `op` (row g: elements 4i and 4i + 1, row g + 8: 4i + 2
  // and 4i + 3, of every n8 tile i).
  template <typename Op>
  __device__ __forceinline__ static void reduce_rows(const float (&s)[4 * kTiles], Op op,
                                                     float (&out)[2]) {
    chain_tree([&](int i, int r) { return op(s[4 * i + 2 * r], s[4 * i + 2 * r + 1]); }, op, out);
  }

  // The tile's row maxima folded into the running ones: alpha (the factor for what was
  // accumulated before, 0 on the first tile) and each row's exponent offset, -max * qk_scale +
  // log2_p_scale.
  __device__ __forceinline__ void fold_max(const float (&s)[4 * kTiles], float qk_scale,
                                           float (&alpha)[2], float log2_p_scale,
                                           float (&neg_max)[2]) {
    float tile_max[2];
    reduce_rows(
        s, [](float a, float b) { return fmaxf(a, b); }, tile_max);
    fold_lane_max(tile_max, qk_scale, alpha, log2_p_scale, neg_max);
  }
  // fold_max from the lane's own maxima of its two rows in the tile.
  __device__ __forceinline__ void fold_lane_max(const float (&tile_max)[2], float qk_scale,
                                                float (&alpha)[2], float log2_p_scale,
                                                float (&neg_max)[2]) {
    float new_max[2] = {fmaxf(row_max[0], tile_max[0]), fmaxf(row_max[1], tile_max[1])};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      // The 4 lanes of a group hold the same rows. Key 0 is visible to every row and tile 0 is
      // never skipped, so new_max is finite here; on the first tile row_max is -inf, alpha 0.
      new_max[r] = fmaxf(new_max[r], __shfl_xor_sync(kFullMask, new_max[r], 1));
      new_max[r] = fmaxf(new_max[r], __shfl_xor_sync(kFullMask, new_max[r], 2));
      alpha[r] = fast_exp2((row_max[r] - new_max[r]) * qk_scale);
      row_max[r] = new_max[r];
      neg_max[r] = fmaf(-new_max[r], qk_scale, log2_p_scale);
    }
  }

  // The tile's probabilities in place, 2^(s * qk_scale + offset) with each row's offset, and
  // their row sums (this lane's share).
  __device__ __forceinline__ static void exponentials(float (&s)[4 * kTiles], float qk_scale,
                                                      const float (&offset)[2],
                                                      float (&tile_sum)[2]) {
#pragma unroll
    for (int i = 0; i < 4 * kTiles; ++i)
      s[i] = fast_exp2(fmaf(s[i], qk_scale, offset[(i >> 1) & 1]));
    reduce_rows(
        s, [](float a, float b) { return a + b; }, tile_sum);
  }

  // step for a P that is rounded to e4m3 next: the probabilities as fp16 pairs, p[q] = elements
  // 2q (low half) and 2q + 1 of the flat array (one row's columns 2t, 2t+1 of an n8 tile; row g
  // for even q, g + 8 for odd). The exponentials are fp32 (ex2.approx.ftz.f32), rounded to fp16
  // in pairs (2^-11 relative: far below e4m3's 2^-4 step, where P is rounded next); the tile's row
  // sums are added in fp16 pairs (4 chains of at most 4 pairs, then a tree: < 2^12 per half at
  // 2^-11 relative steps) and folded into the fp32 running sums. (Until the twenty-first session
  // the exponentials were ex2.approx.f16x2 on the fp16-rounded exponents: sm_90 issues that as two
  // MUFU.EX2.F16 and two byte permutes per pair, so the fp32 ones save the permutes and keep the
  // MUFU count; H200, causal B=2 L=8192: 695.7 -> 713.6 TFLOP/s, B=4 L=4096 632.8 -> 682.5.)
  __device__ __forceinline__ void step_f16(const float (&s)[4 * kTiles], float qk_scale,
                                           float (&alpha)[2], float log2_p_scale,
                                           uint32_t (&p)[2 * kTiles]) {
    float neg_max[2];
    fold_max(s, qk_scale, alpha, log2_p_scale, neg_max);
#pragma unroll
    for (int q = 0; q < 2 * kTiles; ++q) {
      const __half2 e = __floats2half2_rn(fast_exp2(fmaf(s[2 * q], qk_scale, neg_max[q & 1])),
                                          fast_exp2(fmaf(s[2 * q + 1], qk_scale, neg_max[q & 1])));
      p[q] = *reinterpret_cast<const uint32_t*>(&e);
    }
    __half2 tile_sum[2];
    chain_tree([&](int i, int r) { return *reinterpret_cast<const __half2*>(&p[2 * i + r]); },
               [](__half2 a, __half2 b) { return __hadd2(a, b); }, tile_sum);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float2 f = __half22float2(tile_sum[r]);
      row_sum[r] = row_sum[r] * alpha[r] + (f.x + f.y);
    }
  }

  // Folds the tile into the running max and sum and turns it into probabilities (in place),
  // scaled by 2^log2_p_scale (the scheme's p_scale_log2, scheme.h; the row sum is of the same
  // scaled values, so the scale cancels in finish); alpha: the factor for what was accumulated
  // before (0 on the first tile).
  __device__ __forceinline__ void step(float (&s)[4 * kTiles], float qk_scale, float (&alpha)[2],
                                       float log2_p_scale) {
    float neg_max[2], tile_sum[2];
    fold_max(s, qk_scale, alpha, log2_p_scale, neg_max);
    exponentials(s, qk_scale, neg_max, tile_sum);
#pragma unroll
    for (int r = 0; r < 2; ++r) row_sum[r] = row_sum[r] * alpha[r] + tile_sum[r];
  }

  // step_stale: a lane whose scores rise past the running max by more than this (log2 units)
  // takes its own max less this as its reference, so that no exponential overflows fp32.
  static constexpr float kStaleLaneLog2 = 96.0f;

  // step without the quad's shuffles in front of the exponentials, for the tiles after the
  // first (the running max is finite there: key 0 is visible to every row). Each lane takes its
  // P at the running max as it stood before this tile (or, past kStaleLaneLog2, at its own max
  // less that), in place, while its maxima go to the warp's vote. Where no lane's scores rise
  // past the running max by more than headroom_log2 (P's headroom: P at most 2^headroom_log2
  // times 2^log2_p_scale), that max stands for the rows' as far as P is concerned: alpha is 1
  // and the max is not moved. Otherwise the warp folds the tile's max in (the shuffles, as step
  // does) and scales each lane's probabilities and sum from its reference to the new max. The
  // result is step's up to the rounding of the rescale (FlashAttention-4's idea: a max that is
  // seldom raised is seldom worth the shuffles and the rescale). Returns the vote: false where
  // every alpha of the warp is 1.
  __device__ __forceinline__ bool step_stale(float (&s)[4 * kTiles], float qk_scale,
                                             float (&alpha)[2], float log2_p_scale,
                                             float headroom_log2) {
    float lane_max[2];
    reduce_rows(
        s, [](float a, float b) { return fmaxf(a, b); }, lane_max);
    float neg_ref[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      neg_ref[r] =
          log2_p_scale - fmaxf(row_max[r] * qk_scale, fmaf(lane_max[r], qk_scale, -kStaleLaneLog2));
    }
    float tile_sum[2];
    exponentials(s, qk_scale, neg_ref, tile_sum);
    // (-inf, a lane whose share of a row is all masked, is false.)
    const bool rises = (lane_max[0] - row_max[0]) * qk_scale > headroom_log2 ||
                       (lane_max[1] - row_max[1]) * qk_scale > headroom_log2;
    alpha[0] = 1.0f;
    alpha[1] = 1.0f;
    const bool moved = __any_sync(kFullMask, rises);
    if (moved) {
      float neg_max[2], to_max[2];
      fold_lane_max(lane_max, qk_scale, alpha, log2_p_scale, neg_max);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        to_max[r] = fast_exp2(neg_max[r] - neg_ref[r]);  // <= 1: the new max >= the reference
        tile_sum[r] *= to_max[r];
      }
#pragma unroll
      for (int i = 0; i < 4 * kTiles; ++i) s[i] *= to_max[(i >> 1) & 1];
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) row_sum[r] = row_sum[r] * alpha[r] + tile_sum[r];
    return moved;
  }

  // The whole rows' sums (a quad reduction); out_scale: v_scale / l per row, 0 for a row that
  // saw no key.
  __device__ __forceinline__ void finish(float v_scale, float (&out_scale)[2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      row_sum[r] += __shfl_xor_sync(kFullMask, row_sum[r], 1);
      row_sum[r] += __shfl_xor_sync(kFullMask, row_sum[r], 2);
      out_scale[r] = row_sum[r] > 0.0f ? v_scale / row_sum[r] : 0.0f;
    }
  }
};

}  // namespace fp8kv::cuda::prefill
