// Prefill attention, warp-specialized (FA3's recipe on sm_90a): the fast path. One kernel for
// every scheme, in two operand types (WsShape::kFp8Mma):
//  - e4m3 (fp8-per-head): e4m3 Q (quantize_q), K, V; m64nNk32 e4m3 wgmmas; P rounded to e4m3.
//    fp8-per-tensor at D 128 too (WsShape::kQSplit): its bf16 Q is split by the producer into
//    hi = e4m3(q) and lo = e4m3(q - hi) (one power-of-two scale per tile), Q K^T runs over the
//    row [hi | lo] against K twice, so S keeps bf16 Q's bits; P V as fp8-per-head's.
//  - 16-bit (bf16, fp8-per-tensor at D 64 and 256, fp8-e5m2, fp8-per-head-bf16q: bf16 Q):
//    m64nNk16 wgmmas. bf16: K/V copied as they are, P rounded to bf16. The others: f16 operands
//    (WsShape::kF16); e4m3 / e5m2 K/V are copied raw into a staging area of the stage (D 128
//    swizzled: a ring of raw tiles of its own, WsShape::kRawRing) and widened to f16 by the
//    producer (exactly: both are subsets of f16), where the fp8 path transposes V;
//    the producer also scales Q by a power of two into f16's range (exactly, q_to_f16), and P is
//    rounded to f16. The K scale (per tensor or per KV head) folds into the score multiplier and
//    the V scale into the output.
// The CPU twin's semantics (varlen, causal with a cached prefix, GQA, K/V gathered through the
// slot table; P rounded to the operand type as it is, the row sum from the unrounded P); the
// work is split by role and overlapped:
//
//  - A CTA is three warpgroups for 128 query rows of one query head (bf16, swizzled, and
//    fp8-per-head's kItemLoop instance: a persistent CTA per SM that walks such items in turn,
//    kPersistent, where the host launches it so: kPrefillPersistentCtas, even batches). Warpgroup 0
//    is the producer: it gathers Q and the K/V tiles with cp.async (a slot per key row, so no TMA),
//    transposes V into V^T (wgmma reads 8-bit operands only K-major) and publishes each stage on
//    its `full` mbarrier (bf16 K/V, swizzled: K and V of a stage apart, by the hardware as their
//    copies land, and released apart: kSplitKv; e4m3 at D 256: K so, V^T by the producer, kApart).
//    It gives most of its registers away (setmaxnreg) to the two consumer warpgroups, which own 64
//    query rows each and only compute.
//  - The K/V tiles go round a ring of kStages stages: a consumer warpgroup arrives on the
//    stage's `empty` mbarrier once its wgmmas have read it, and the producer refills it after
//    both have. Their softmaxes run under each other's wgmmas; with bf16 operands at D 128 they
//    also take turns issuing those (ping-pong, kPingPong below), the others never wait for each
//    other.
//  - Inside a consumer warpgroup, the QK^T of tile j and the PV of tile j-1 are issued together
//    (e4m3 persistent and D 256: the PV as soon as P(j-1) is packed, kEarlyPv); once the PV has
//    landed it is added to O (e4m3: each tile's PV summed from zero, kPromote) and O rescaled.
//    The source waits for that PV after the softmax of tile j (FA3's intra-warpgroup overlap),
//    but ptxas places the wait before it; kept behind it, the softmax measured no faster
//    (docs/GPU.md, twenty-ninth and thirtieth sessions).
//
// Operand layouts: wgmma reads 8-bit operands only K-major. Without kSwizzle, the canonical
// no-swizzle layout: 8 x 16-byte core matrices stored as 128 contiguous bytes; core matrices
// adjacent in K are kCoreBytes apart (the descriptor's leading byte offset), those adjacent in
// M/N (K bytes / 16) * 128 apart (its stride byte offset). Q and K are [rows][D] that way; V
// arrives as plain rows [keys][D] and the producer transposes each tile into V^T [D][keys]
// (ldmatrix.trans plus byte permutes), the keys of each 32-key chunk stored in the order
// {2t, 2t+1, 2t+8, 2t+9} (t = 0..3), then 16 + those: the order in which the S accumulators hold
// them, so P's A fragment is a plain repacking of S. Shared memory written by the generic proxy
// (cp.async, st.shared) is read by wgmma through the async proxy: the producer fences
// (fence.proxy.async) before publishing a stage.
//
// 16-bit operands (bf16, f16), always in the 128-byte swizzle layout (kSwizzle below): Q and K
// with rows of 2D bytes (a k16 step is 32 bytes of a row, as an e4m3 k32 step is). 16-bit wgmmas
// read B MN-major too (imm-trans-b), so V stays [keys][D] in the layout K has: the PV product's B
// is K = keys by N = D with D contiguous, in atoms of 8 keys x 64 d (1024 bytes, the stride byte
// offset) and 64-d column blocks [kBlockN][128 bytes] apart (the leading byte offset). The 16-bit A
// fragment of a wgmma is the accumulator layout's pairs, so P is S repacked in the natural key
// order. bf16 tiles are twice the bytes: keys per tile and stages per scheme and D (kWsBlockN,
// kWsStages in prefill_instances.cuh) keep a CTA within 227 KB, the raw staging counted.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "fp8kv/backend.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/prefill_common.cuh"
#include "kernels/cuda/prefill_instances.cuh"  // kWsQSplit
#include "kernels/cuda/prefill_launch.cuh"     // the timeline's events
#include "kernels/cuda/prefill_wgmma_ops.cuh"

namespace fp8kv::cuda::prefill {

template <KvScheme S, int D, int kBlockN, int kStages>
struct WsShape {
  // fp8-per-tensor at D 128 (kQSplit): its bf16 Q is split into two e4m3 parts, hi = e4m3(q) and
  // lo = e4m3(q - hi), scaled by one power of two per tile (q_split), so that Q K^T runs as e4m3
  // wgmmas over the Q row [hi | lo] against K twice (hi + lo keeps bf16's 8 bits for every element
  // within 2^-9 of the tile's largest); K and V then go as fp8-per-head's (K as stored, V
  // transposed, P rounded to e4m3): no widening.
  static constexpr bool kQSplit = kWsQSplit<S, D>;      // (prefill_instances.cuh, from fp8_p)
  static constexpr bool kFp8Mma = fp8_q(S) || kQSplit;  // e4m3 operands and wgmmas; else 16-bit
  static constexpr bool kWiden = !kFp8Mma && kv_codec(S) != KvCodec::kBf16;  // fp8 K/V -> 16-bit
  // The widened schemes' 16-bit operands are f16: e4m3 / e5m2 widen to f16 in one convert (to
  // bf16, four), exactly; Q is scaled by a power of two into f16's range (q_to_f16); P is rounded
  // to f16 (2^-11 relative, where bf16 rounds to 2^-8).
  static constexpr bool kF16 = kWiden;
  static constexpr int kOpBytes = kFp8Mma ? 1 : 2;          // bytes of an operand element
  static constexpr int kKvRowBytes = D * kv_elem_bytes(S);  // a K or V row of the cache
  static constexpr int kRowBytes = D * kOpBytes;            // a Q, K or V operand row
  static constexpr int kProducerThreads = 128;
  static constexpr int kThreads = 3 * 128;
  static constexpr int kBlockM = 128;  // 2 consumer warpgroups x 64 rows
  static constexpr int kKBlockStride = kRowBytes / 16 * kCoreBytes;  // 8 rows of a [rows][D] tile
  static constexpr int kQRowBytes = kQSplit ? 2 * kRowBytes : kRowBytes;  // a Q operand row
  static constexpr int kQSrcRowBytes = kQSplit ? 2 * D : kRowBytes;       // a Q row as given
  static constexpr int kQBytes = kBlockM * kQRowBytes;  // canonical [kBlockM][D] ([hi | lo])
  static constexpr int kKBytes = kBlockN * kRowBytes;   // canonical [kBlockN][D]
  static constexpr int kVtBytes =
      D * kBlockN * kOpBytes;  // V^T [D][kBlockN] or (bf16) V [kBlockN][D]
  static constexpr int kVtBlockStride = kBlockN / 16 * kCoreBytes;  // 8 d rows of V^T: SBO
  static constexpr int kVPitch = D + 16;                            // V rows as loaded, padded
  // Raw fp8 rows as loaded, for the producer to transpose (e4m3 V) or widen (K then V): padded
  // rows for the transposition and for D = 64, else D-byte rows with chunk c of row r stored at
  // c ^ (r % 8) (the widening reads 8 rows of one column: conflict-free either way).
  // (kQSplit: D-byte XOR-placed V rows too, so that 4 stages fit beside its 32 KB Q tile.)
  static constexpr int kRawPitch = (kFp8Mma && !kQSplit) || D == 64 ? kVPitch : D;
  // The raw rows of a tile: K rows then V rows (widened) or V rows (e4m3).
  static constexpr int kRawTileBytes = (kWiden ? 2 : 1) * kBlockN * kRawPitch;
  // kRawRing (the widened schemes with 2 operand stages: D 128 swizzled, 128 keys per tile, and D
  // 256, 48 keys, where 3 stages of 16-bit K and V and their raw rows would not fit beside Q): the
  // raw rows go round a
  // ring of two tiles of their own, so that the loads of a tile need no operand stage, and K and V
  // are published and released apart (kApart), so that 2 operand stages keep the pipeline going.
  // The same at D 256 (32 keys x 4 operand stages, where 3 stages held the raw rows in each):
  // H200, fp8-per-tensor causal B=2 L=8192 368.6 -> 431.5 TFLOP/s (nineteenth session); now 48
  // keys x 2 operand stages (431 -> 510: a tile's fixed work over 48 keys instead of 32).
  static constexpr bool kRawRing = kWiden && kStages == 2;
  static constexpr int kVRowsBytes = (kFp8Mma || kWiden) && !kRawRing ? kRawTileBytes : 0;
  static constexpr int kStageBytes = kKBytes + kVtBytes + kVRowsBytes;
  static constexpr int kRawRingOffset = kQBytes + kStages * kStageBytes;
  static constexpr int kBarOffset = kRawRingOffset + (kRawRing ? 2 * kRawTileBytes : 0);
  // K and V published and released apart (kSplitKv, the swizzled bf16 instances): bf16 K/V,
  // copied as they are stored, land straight in their operand tiles, so the hardware publishes
  // them (cp.async's mbarrier arrival) and the consumers release K(j) once S(j) has landed, V(j)
  // once P V(j) has. With 3 stages of 128 keys (bf16 D 128) a stage was refilled only after the
  // later warpgroup's P V of it, half a tile before the earlier one needed the next: apart, K and
  // V each have about two consumer tiles of lead. H200, causal B=2 L=8192: 507 -> 572 TFLOP/s.
  static constexpr bool kSplitKvOperands = !kFp8Mma && !kWiden;  // and swizzled: kSplitKv
  // full[], empty[] (K, V), q_empty (both consumer warpgroups' last S of an item has landed: Q
  // may be refilled), then (kF16) the two words where the producer reduces Q's largest |bf16|
  // (item n uses word n % 2: the other is reset meanwhile).
  static constexpr int kQEmptyOffset = kBarOffset + 4 * kStages * 8;
  static constexpr int kQMaxOffset = kQEmptyOffset + 8;
  static constexpr int kSmemBytes = kQMaxOffset + (kF16 || kQSplit ? 8 : 0);
  static constexpr int kChunks = kRowBytes / 16;               // 16-byte chunks per operand row
  static constexpr int kRowStep = kProducerThreads / kChunks;  // rows between a thread's chunks
  static constexpr int kKvChunks = kKvRowBytes / 16;           // ... per cache row
  static constexpr int kKvRowStep = kProducerThreads / kKvChunks;
  static constexpr int kKvRowsPerThread = kBlockN / kKvRowStep;
  static constexpr int kQRowsPerThread = kBlockM / kRowStep;
  static constexpr int kQkSteps = kQRowBytes / 32;  // k-steps of Q K^T: 32 bytes of a Q row each
  static constexpr int kPvSteps = kBlockN * kOpBytes / 32;  // k-steps of P V: 32 bytes of keys
  // 128 * producer + 256 * consumer registers <= the 384 * 168 the launch bounds allot. bf16: the
  // producer copies twice the rows per thread (72: no spills), the consumers need less than 216.
  static constexpr int kProducerRegs = kFp8Mma ? 56 : 72;
  static constexpr int kConsumerRegs = kFp8Mma ? 224 : 216;
  static_assert(kStageBytes % 128 == 0, "stages stay 128-byte aligned");
  // A consumer releases tile j-1 only after tile j is full (it issues PV(j-1) with QK(j)), and the
  // producer publishes tile j - (kStages - 2) after issuing the loads of tile j: so two stages
  // are held by the consumers and kStages - 2 are in flight; with two stages the load of tile j
  // would wait for the release of tile j-2, which waits for tile j-1 to be published.
  // (K and V published and released apart, kRawRing and the swizzled bf16 instances, kSplitKv:
  // K(j) waits only for the release of K(j-2), after S(j-2), and V(j) for P V(j-2), which the
  // consumers issue with QK(j-1): two stages suffice. The kernel checks kSplitKv's swizzle.)
  static_assert(kStages >= 3 || kRawRing || kSplitKvOperands,
                "the ring needs a stage of slack (see above)");
  static_assert(kBlockN == 64 || kBlockN == 128 || (!kFp8Mma && (kBlockN == 48 || kBlockN == 192)),
                "QK^T wgmma N");
  static_assert(D == 64 || D == 128 || D == 256, "PV wgmma N");
  static_assert(kBlockN % kKvRowStep == 0 && kBlockM % kRowStep == 0, "rows split over threads");
  static_assert(kKvRowBytes == kRowBytes || kWiden, "K/V copied as they are stored, or widened");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory of one CTA exceeds Hopper's limit");
};

// f16 operands (WsShape::kF16): the CTA's Q tile is stored as q * 2^shift, from the largest |q|
// of the tile (`max_bits`: its bf16 bits without the sign), so that the largest lands in
// [2^15, 2^16): bf16 -> f16 is then exact for every element of at least 2^-32 times the largest
// (f16 has 3 more mantissa bits; 1.9921875 * 2^15 = 65280 < 65504), smaller ones round to f16's
// subnormal step. Clamped to +-100 (2^shift a normal float): a tile below 2^-85 stays exact, one
// above 2^116 (scores past fp32 anyway) would overflow. An all-zero tile: 0.
__device__ __forceinline__ int q_f16_shift(uint32_t max_bits) {
  if (max_bits == 0) return 0;
  const int exponent = static_cast<int>(max_bits >> 7) - 127;
  return min(100, max(-100, 15 - exponent));
}
// kQSplit: the tile's largest |q| into [2^7, 2^8), below e4m3's largest (448); the same clamp.
__device__ __forceinline__ int q_e4m3_shift(uint32_t max_bits) {
  if (max_bits == 0) return 0;
  const int exponent = static_cast<int>(max_bits >> 7) - 127;
  return min(100, max(-100, 7 - exponent));
}
__device__ __forceinline__ float exp2_int(int e) { return __int_as_float((127 + e) << 23); }

// Byte offset of 16-byte chunk `chunk` of row `row` in a [rows][kRowBytes] operand tile: the
// canonical no-swizzle layout (core matrices of 8 rows x 16 bytes; adjacent in the row 128
// bytes apart, adjacent 8-row groups kRowBytes / 16 * 128 apart), or the 128-byte swizzle
// layout (column blocks of [rows][128 bytes], chunk c of a row stored at c ^ (row % 8)).
template <int kRowBytes, bool kSwizzle>
__device__ __forceinline__ int operand_offset(int row, int chunk, int rows) {
  if constexpr (kSwizzle) {
    return (chunk / 8) * rows * 128 + row * 128 + (((chunk % 8) ^ (row % 8)) << 4);
  }
  return (row / 8) * (kRowBytes / 16 * kCoreBytes) + chunk * kCoreBytes + (row % 8) * 16;
}

// Options (template flags, each a built instance: prefill_instances.cuh). Packed GQA (a CTA
// taking the G query heads of one KV head) was built and measured here, never faster on the
// H200, and is retired (tag tried/prefill-packgqa-pingpong); ping-pong turns, retired with it
// then, measured faster for bf16 operands at D 128 once the consumer loop got shorter and are
// back for that case alone (kPingPong, a property of the instance, not a flag).
//  - kSwizzle (e4m3: D = 128, 128 keys per tile: every operand row is 128 bytes; 16-bit
//    operands: every instance, their plain-layout instances lost at every D and are retired,
//    docs/GPU.md, fifty-second session): Q, K and V^T (V) in the 128-byte-swizzled layout instead
//    of the canonical no-swizzle one; a tile is then column blocks of [rows][128 bytes], a row's
//    128 bytes contiguous (16-byte chunk c of row r stored at chunk c ^ (r % 8)), so 8 consecutive
//    producer threads copy 128 contiguous bytes of the cache (one line) into one whole
//    shared-memory row, conflict-free.
//  - kDiag: 0 in every real use. The benchmark's diagnostic configs time one side of the
//    pipeline alone (the results are wrong by design): 1 = the producer loads only the first
//    kStages tiles (the consumers' bound), 2 = the consumers skip their math (the producer's).
//  - kItemLoop (D 64 and 128: e4m3 operands, and the widened schemes' swizzled kernels):
//    persistent CTAs (kPersistent below), an instance of its own beside the one-item kernel,
//    which keeps its code.
template <KvScheme S, int D, int kBlockN, int kStages, bool kSwizzle, int kDiag, bool kItemLoop>
__global__ void __launch_bounds__(384, 1) prefill_ws_kernel(const PrefillParams p) {
  using Sh = WsShape<S, D, kBlockN, kStages>;
  static_assert(!kSwizzle || !Sh::kFp8Mma || (D == 128 && kBlockN == 128),
                "swizzled e4m3 rows (Q, K and V^T) are exactly 128 bytes");
  static_assert(!kSwizzle || (Sh::kQBytes % 1024 == 0 && Sh::kStageBytes % 1024 == 0),
                "swizzle atoms (8 rows x 128 bytes) stay 1024-byte aligned");
  static_assert(kSwizzle || Sh::kChunks <= 16, "no-swizzle copies: 8 threads per column chunk");
  static_assert(kSwizzle || Sh::kFp8Mma, "16-bit operands are swizzled");
  constexpr bool kSplitKv = Sh::kSplitKvOperands && kSwizzle;
  static_assert(kStages >= 3 || Sh::kRawRing || kSplitKv, "2 stages: K and V apart (WsShape)");
  // K and V^T apart for e4m3 operands with a 3-stage ring (D 256): K, copied as it is stored,
  // published by the hardware as it lands and released once S has; V^T published by the producer
  // after its transposition and released once P V has (the raw V rows are the producer's own
  // until then). H200, causal B=2 L=8192: D 256 490 -> 624 TFLOP/s; with 4 stages (D 64, 128),
  // where the producer finishes a tile ahead (kFinishFirst), it measured slower (438 -> 381,
  // 692 -> 663) and they keep one barrier pair per stage.
  constexpr bool kApart = kSplitKv || (Sh::kFp8Mma && kStages < 4) || Sh::kRawRing;
  // Persistent CTAs (below) for the kSplitKv instances, the default of bf16 at every head dim.
  // H200, A/B in one call (items dealt out in snake rounds, causal B=2 L=8192 unless said):
  // bf16 572 -> 600 TFLOP/s, non-causal 579 -> 611, B=16 L=1024 341 -> 369, B=4 L=4096 518 ->
  // 546, D 64 385 -> 392, D 256 481 -> 491. The widened instances measured slower with the item
  // loop compiled in while their producer set the pace (fifteenth session, fp8-per-tensor 405 ->
  // 322); since its rework they gain (nineteenth: causal 504 -> 552, B=16 L=1024 284 -> 329, D 64
  // 362 -> 384; D 256 368 -> 365 on its old ring, 431 -> 443 on the raw ring, with ping-pong
  // turns), an instance of their own too (kItemLoop). The e4m3 ones
  // (fp8-per-head) gain where items are short and lose where they are long, and lose with the
  // loop compiled in even where it runs one item per CTA (seventeenth session, H200, the loop
  // against one CTA per item: B=16 L=1024 344 -> 406 TFLOP/s, B=4 L=4096 603 -> 624, D 64
  // B=2 L=8192 458 -> 470; B=2 L=8192 698 -> 685, non-causal 738 -> 709, B=1 L=16384 734 ->
  // 693, D 256 647 -> 587, cached prefix 552 -> 518): so the loop is an instance of its own
  // (kItemLoop), which prefill.cu picks for even batches of short requests.
  static_assert(!kItemLoop || Sh::kFp8Mma || Sh::kWiden, "item loop instances: e4m3, widened");
  constexpr bool kPersistent = kSplitKv || kItemLoop;
  // The widened schemes' item loop keeps more producer state live across items: at 72 registers
  // it spilled 72 bytes (88: 20), at 96 none, with the consumers at 200 (no spills either).
  constexpr bool kWidenedLoop = kItemLoop && Sh::kWiden;
  constexpr int kProducerRegs = kWidenedLoop ? 96 : Sh::kProducerRegs;
  constexpr int kConsumerRegs = kWidenedLoop ? 200 : Sh::kConsumerRegs;
  static_assert(kProducerRegs + 2 * kConsumerRegs <= 3 * 168, "the launch bounds' registers");
  extern __shared__ __align__(1024) uint8_t smem[];  // swizzle atoms: 8 rows x 128 B, aligned
  const uint32_t base = smem_addr(smem);
#ifdef FP8KV_PREFILL_TIMELINE
  // Diagnostic build: lane 0 of each warpgroup's first warp in CTA 0 stamps its phases during
  // its first item (prefill_launch.cuh, set_prefill_timeline); everyone else stamps nothing. Only
  // a predicate stays live (the address is recomputed from the parameter at each stamp): the
  // consumers sit at their register cap, and a live pointer made them spill.
  bool tl_on = p.timeline != nullptr && blockIdx.x == 0 && threadIdx.x % 128 == 0;
  auto stamp = [&](int tile, int event) {
    if (tl_on && tile >= 0 && tile < kPrefillTimelineTiles) {
      const size_t role = threadIdx.x / 128;
      p.timeline[(role * kPrefillTimelineTiles + tile) * kPrefillTimelineEvents + event] =
          static_cast<uint32_t>(clock());
    }
  };
  auto item_done = [&] { tl_on = false; };
#else
  auto stamp = [](int, int) {};  // the default build: nothing
  auto item_done = [] {};
#endif

  // Persistent (kPersistent): the CTA runs the items of its rounds (prefill_round_item,
  // prefill_item), the ring turning on across them (`ring`: the ring index of the item's first
  // key tile; stage and phase follow from the ring index). So the producer loads the next item's
  // Q, once both consumer warpgroups have their last S of this one (q_empty), and its first
  // tiles while they finish this item's tiles and write its output: no CTA start, barrier setup
  // or empty ring per tile of 128 rows. Otherwise the loop below runs once (the CTA's item
  // blockIdx.x, ring and n 0: what the compiler sees), one CTA per item.
  const uint32_t full_bar = base + Sh::kBarOffset;    // full[s]: the stage's K and V^T landed
  const uint32_t empty_bar = full_bar + 8 * kStages;  // empty[s]: both consumers are done with it
  // kApart: full[] and empty[] are K's; V (V^T) has its own pair.
  const uint32_t v_full_bar = empty_bar + 8 * kStages;
  const uint32_t v_empty_bar = v_full_bar + 8 * kStages;
  const uint32_t q_empty_bar = base + Sh::kQEmptyOffset;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(full_bar + 8 * s, Sh::kProducerThreads);
      mbarrier_init(empty_bar + 8 * s, 8);  // lane 0 of each consumer warp
      if constexpr (kApart) {
        mbarrier_init(v_full_bar + 8 * s, Sh::kProducerThreads);
        mbarrier_init(v_empty_bar + 8 * s, 8);
      }
    }
    mbarrier_init(q_empty_bar, 8);  // lane 0 of each consumer warp
    if constexpr (Sh::kF16 || Sh::kQSplit) {
      reinterpret_cast<uint32_t*>(smem + Sh::kQMaxOffset)[0] = 0;
      reinterpret_cast<uint32_t*>(smem + Sh::kQMaxOffset)[1] = 0;
    }
    fence_barrier_init();
  }
  __syncthreads();
  // The stage of ring index J (the item's ring + its tile j).
  auto stage_addr = [&](int J) { return base + Sh::kQBytes + (J % kStages) * Sh::kStageBytes; };
  const int num_items = prefill_items(p);
  const int kv_group = p.num_q_heads / p.num_kv_heads;

  if (threadIdx.x < Sh::kProducerThreads) {
    // ================================ producer ================================
    regs_decrease<kProducerRegs>();
    const int tid = threadIdx.x;
    // D 128: the warp index broadcast from lane 0, as the consumers' (warp-uniform for ptxas):
    // fp8-per-head 647 -> 660 TFLOP/s, bf16 496 -> 502 on the H200 (causal B=2 L=8192); at D 64
    // it measured 448 -> 435 for fp8-per-head, so there it stays the plain quotient.
    const int warp = D == 128 ? warp_uniform(tid / 32) : tid / 32;
    const int lane = tid % 32;
    // 8 consecutive threads take rows r..r+7 of one 16-byte column chunk: each 8-thread phase
    // writes one whole core matrix (128 contiguous bytes).
    // Swizzled: consecutive threads take consecutive chunks of one row instead.
    const int ld_chunk = kSwizzle ? tid % Sh::kChunks : (tid / 8) % Sh::kChunks;
    const int ld_row = kSwizzle ? tid / Sh::kChunks : (tid / (8 * Sh::kChunks)) * 8 + tid % 8;
    auto canonical = [&](int row, int rows) {  // ld_chunk of `row` of a [rows][D] operand tile
      return operand_offset<Sh::kRowBytes, kSwizzle>(row, ld_chunk, rows);
    };
    auto raw_offset = [](int row, int chunk) {  // widened K/V: chunk of a raw row (kRawPitch)
      if constexpr (D == 64) return row * Sh::kRawPitch + chunk * 16;
      return row * Sh::kRawPitch + ((chunk ^ (row % 8)) << 4);
    };
    // Item n's Q tile (`rows` rows from q_base, the item's first token of its query head), once
    // the consumers are done with item n - 1's: issued before the item's first tile, and
    // published with it (the same cp.async group, or covered by its K rows' mbarrier arrival).
    auto q_source = [&](int head, const PrefillSeq& seq) {
      return static_cast<const uint8_t*>(p.q) +
             (static_cast<int64_t>(seq.q_begin + seq.q0) * p.num_q_heads + head) *
                 Sh::kQSrcRowBytes;
    };
    // This thread's Q chunk i: row ld_row + i * kRowStep. Where those rows are whole 8-row groups
    // apart (all but 16-bit D 256), chunk i lies i * kQStepBytes after chunk 0 in either layout
    // (operand_offset), and the source rows i * kRowStep tokens apart: one address and a step
    // each, where an address per row had the persistent kernels' producer keep every row's
    // addresses live across its item loop (H200, fp8-per-head causal B=2 L=8192 794 -> 839
    // TFLOP/s, non-causal 746 -> 806, B=4 L=4096 687 -> 736: docs/GPU.md, sixty-fourth session).
    constexpr int kQStepBytes =
        kSwizzle ? Sh::kRowStep * 128 : Sh::kRowStep / 8 * Sh::kKBlockStride;
    uint8_t* const q_chunk0 = smem + canonical(ld_row, Sh::kBlockM);
    auto q_chunk = [&](int i) {
      if constexpr (Sh::kRowStep % 8 == 0) return q_chunk0 + i * kQStepBytes;
      return smem + canonical(ld_row + i * Sh::kRowStep, Sh::kBlockM);
    };
    // kQSplit: bf16 chunk 2m + h (dims 16m + 8h ..) of a row lands at chunk m of the hi (h 0) or
    // lo (h 1) half of the Q operand row, where q_split reads both and writes hi and lo in place.
    // Thread tid copies chunk 2m + h (m = tid % 8, h = tid / 8 % 2) of rows tid / 16 + 8i.
    const int qs_m = tid % 8;
    const int qs_h = (tid / 8) % 2;
    const int qs_r0 = tid / 16;
    uint8_t* const qs_chunk0 =
        smem + operand_offset<Sh::kQRowBytes, true>(qs_r0, qs_m + 8 * qs_h, Sh::kBlockM);
    auto issue_q = [&](int n, const uint8_t* q_base, int rows) {
      if (kPersistent && n > 0) mbarrier_wait(q_empty_bar, (n - 1) & 1);
      if constexpr (Sh::kQSplit) {
        const int64_t token_bytes = static_cast<int64_t>(p.num_q_heads) * Sh::kQSrcRowBytes;
        const uint8_t* src = q_base + qs_r0 * token_bytes + (2 * qs_m + qs_h) * 16;
#pragma unroll
        for (int i = 0; i < Sh::kBlockM / 8; ++i) {
          const bool valid = qs_r0 + 8 * i < rows;
          cp_async_16(qs_chunk0 + i * 8 * 128, valid ? src : p.q, valid ? 16 : 0);
          src += 8 * token_bytes;
        }
        return;
      }
      const int64_t token_bytes = static_cast<int64_t>(p.num_q_heads) * Sh::kRowBytes;
      const uint8_t* src = q_base + ld_row * token_bytes + ld_chunk * 16;
#pragma unroll
      for (int i = 0; i < Sh::kQRowsPerThread; ++i) {
        const bool valid = ld_row + i * Sh::kRowStep < rows;
        cp_async_16(q_chunk(i), valid ? src : p.q, valid ? 16 : 0);
        src += Sh::kRowStep * token_bytes;
      }
    };
    // K/V rows: as Q's, or (widened) raw rows, consecutive threads on consecutive chunks of a row.
    const int kv_chunk = Sh::kWiden ? tid % Sh::kKvChunks : ld_chunk;
    const int kv_row = Sh::kWiden ? tid / Sh::kKvChunks : ld_row;
    const int64_t slot_bytes = 2 * static_cast<int64_t>(p.num_kv_heads) * Sh::kKvRowBytes;
    // V^T writes: lane (g, t) gets, from the 4 matrices of keys c*32 + {0-7, 8-15, 16-23, 24-31}
    // at d block dp*16, the words of d = dp*16 + 2g (even) and + 1 (odd) for key slots c*32 + 4t
    // (keys 2t, 2t+1, 2t+8, 2t+9) and c*32 + 16 + 4t.
    const int g = lane / 4;
    const int t = lane % 4;
    const int mat = lane / 8;
    const int mat_row = lane % 8;
    auto transpose_v = [&](uint32_t st) {  // e4m3: V rows -> V^T
      const uint32_t v_rows = st + Sh::kKBytes + Sh::kVtBytes;
      uint8_t* const vt = smem + (st - base) + Sh::kKBytes;
      constexpr int kBlocks = (kBlockN / 32) * (D / 16);
      // Warp w moves blocks w + 4k (k = 0 .. kBlocks / 4 - 1): a key chunk's D / 16 blocks are
      // whole rounds of the 4 warps, so block w + 4k is d block 4k % (D / 16) + w of key chunk
      // 4k / (D / 16): no quotient or remainder of the warp's block index (signed, in the loop,
      // they took most of the ~20 instructions a block cost). Unrolled whole, the loop spills in
      // the persistent D 128 instance's producer (56 registers): it stays unrolled by 2.
      static_assert((D / 16) % 4 == 0 && kBlocks % 4 == 0, "whole rounds of the 4 warps");
      auto chunk_of = [](int k) { return 4 * k / (D / 16); };
      auto block_of = [&](int k) { return 4 * k % (D / 16) + warp; };
      auto load = [&](int k, uint32_t(&r)[4]) {
        const int c = chunk_of(k);
        const int dp = block_of(k);
        const int row = c * 32 + mat * 8 + mat_row;  // (row % 8 == mat_row)
        ldmatrix_x4_trans(r, v_rows + (Sh::kQSplit ? row * 128 + ((dp ^ mat_row) << 4)
                                                   : row * Sh::kVPitch + dp * 16));
      };
      auto store = [&](int k, const uint32_t(&r)[4]) {
        const int c = chunk_of(k);
        const int dp = block_of(k);
        const int d_even = dp * 16 + 2 * g;
        if constexpr (kSwizzle) {  // V^T row d: 128 key bytes, key chunk k at k ^ (d % 8)
          // The four words above are, across the warp, four 8 x 16-byte matrices (rows d_even
          // and d_even + 1 of key chunks 2c and 2c + 1; lane (g, t) holds bytes 4t.. of row g):
          // one stmatrix stores them (as FA3 stores its transposed V), where four 32-bit stores
          // and their addresses were; lane 8m + r names row r of matrix m. The same bank
          // conflicts (rows g and g + 4 share a 16-byte slot) and bytes.
          const uint32_t w[4] = {__byte_perm(r[0], r[1], 0x6420), __byte_perm(r[0], r[1], 0x7531),
                                 __byte_perm(r[2], r[3], 0x6420), __byte_perm(r[2], r[3], 0x7531)};
          const int d = dp * 16 + 2 * mat_row + (mat & 1);
          const int chunk = 2 * c + (mat >> 1);
          stmatrix_x4(st + Sh::kKBytes + d * 128 + ((chunk ^ (d & 7)) << 4), w);
          return;
        }
        const int e_off = (d_even / 8) * Sh::kVtBlockStride + (d_even % 8) * 16;
        const int o_off = e_off + 16;  // d_odd = d_even + 1: the next row of the core matrix
        const uint32_t col0 = (2 * c) * kCoreBytes + 4 * t;
        const uint32_t col1 = col0 + kCoreBytes;
        *reinterpret_cast<uint32_t*>(vt + e_off + col0) = __byte_perm(r[0], r[1], 0x6420);
        *reinterpret_cast<uint32_t*>(vt + o_off + col0) = __byte_perm(r[0], r[1], 0x7531);
        *reinterpret_cast<uint32_t*>(vt + e_off + col1) = __byte_perm(r[2], r[3], 0x6420);
        *reinterpret_cast<uint32_t*>(vt + o_off + col1) = __byte_perm(r[2], r[3], 0x7531);
      };
      // D 256: two blocks a step, both loaded before either is stored (the asm statements keep
      // their order, so a load-store loop waits out each ldmatrix's latency in turn). H200, causal
      // B=2 L=8192, two calls: D 256 645 -> 667 and 644 -> 667 TFLOP/s; at D 128 (697 -> 697,
      // non-causal 732 -> 720) and D 64 (476 -> 412) it did not pay: they keep one block a step.
      constexpr int kPerStep = D == 256 ? 2 : 1;
#pragma unroll 2
      for (int k = 0; k < kBlocks / 4; k += kPerStep) {
        uint32_t r[kPerStep][4];
#pragma unroll
        for (int u = 0; u < kPerStep; ++u) load(k + u, r[u]);
#pragma unroll
        for (int u = 0; u < kPerStep; ++u) store(k + u, r[u]);
      }
    };
    // Widening (fp8-per-tensor, fp8-e5m2, fp8-per-head-bf16q): 16 raw codes of a K or V row become
    // two 16-byte f16 chunks of the operand tile, exactly. 8 consecutive threads take 8
    // consecutive rows of one raw column: conflict-free reads (padded or XOR-placed raw rows)
    // and writes (8 rows of one core matrix, or 8 distinct swizzled chunks).
    // Thread tid widens raw column chunk wc of rows wr0 + i * kWidenStep (i = 0, 1, ...) of a
    // tile's K (and V) rows. A row's chunk placement repeats every 8 rows and kWidenStep is a
    // multiple of 8, so every offset is this thread's constant plus i times a stride: computed
    // once here, where the per-chunk index arithmetic (signed quotients and remainders) had made
    // the widening ~4.6 instructions per useful one (profiled, fp8-per-tensor D 128: the producer
    // executed twice the consumers' instructions and set the kernel's pace).
    constexpr int kWidenStep = Sh::kProducerThreads / Sh::kKvChunks;  // rows per pass
    constexpr int kRawStride = kWidenStep * Sh::kRawPitch;
    constexpr int kOpStride = kWidenStep * 128;  // (the widened operands are swizzled)
    static_assert(!Sh::kWiden || (kWidenStep % 8 == 0 && kBlockN % kWidenStep == 0),
                  "whole 8-row column groups per pass");
    const int wc = (tid / 8) % Sh::kKvChunks;
    const int wr0 = (tid / (8 * Sh::kKvChunks)) * 8 + tid % 8;
    const int w_raw0 = raw_offset(wr0, wc);
    const int w_op0 = operand_offset<Sh::kRowBytes, kSwizzle>(wr0, 2 * wc, kBlockN);
    const int w_op1 = operand_offset<Sh::kRowBytes, kSwizzle>(wr0, 2 * wc + 1, kBlockN);
    // kParts 2: K then V raw rows into the K then V operand tiles; 1: one of them.
    auto widen = [&](uint8_t* const k_op, const uint8_t* const raw, auto parts) {
#pragma unroll
      for (int part = 0; part < decltype(parts)::value; ++part) {
        const uint8_t* const src = raw + part * kBlockN * Sh::kRawPitch + w_raw0;
        uint8_t* const dst = k_op + part * Sh::kKBytes;
        // All of a part's raw chunks read before the first store: the compiler may not move a
        // shared load above a store that could alias it, so a load-widen-store loop waits out
        // each load's latency in turn. H200, fp8-per-tensor: causal B=2 L=8192 475 -> 495
        // TFLOP/s, B=4 L=4096 410 -> 440, D 256 336 -> 368, D 64 347 -> 357.
        constexpr int kN = kBlockN / kWidenStep;
        uint4 codes[kN];
#pragma unroll
        for (int i = 0; i < kN; ++i)
          codes[i] = *reinterpret_cast<const uint4*>(src + i * kRawStride);
#pragma unroll
        for (int i = 0; i < kN; ++i) {
          uint4 w0, w1;
          fp8x16_to_f16<kv_codec(S)>(codes[i], w0, w1);
          *reinterpret_cast<uint4*>(dst + w_op0 + i * kOpStride) = w0;
          *reinterpret_cast<uint4*>(dst + w_op1 + i * kOpStride) = w1;
        }
      }
    };
    // Q's largest |bf16| (kF16, kQSplit: with an item's first tile, Q's copies landed) over this
    // thread's kCount chunks chunk(0..) and then the producer: reduced into word n % 2 at
    // kQMaxOffset (which the consumers read once the tile is published; the other word, last read
    // by the consumers of item n - 1 before they released their Q, is reset for item n + 1).
    // Returns 2^shift(the largest's bits) (q_f16_shift or q_e4m3_shift).
    auto q_tile_scale = [&](int n, auto chunk, auto count, auto shift) {
      uint32_t* const q_max = reinterpret_cast<uint32_t*>(smem + Sh::kQMaxOffset) + (n & 1);
      uint32_t m = 0;
#pragma unroll 4
      for (int i = 0; i < decltype(count)::value; ++i) {
        const uint4 v = *reinterpret_cast<const uint4*>(chunk(i));
        m = __vmaxu2(m, __vmaxu2(__vmaxu2(v.x & 0x7fff7fffu, v.y & 0x7fff7fffu),
                                 __vmaxu2(v.z & 0x7fff7fffu, v.w & 0x7fff7fffu)));
      }
      m = __reduce_max_sync(kFullMask, max(m & 0xffffu, m >> 16));
      if (lane == 0) atomicMax(q_max, m);
      named_barrier_sync(1, Sh::kProducerThreads);
      const float scale = exp2_int(shift(*reinterpret_cast<volatile uint32_t*>(q_max)));
      if (tid == 0) reinterpret_cast<uint32_t*>(smem + Sh::kQMaxOffset)[(n + 1) & 1] = 0;
      return scale;
    };
    // kF16: this thread's Q chunks rewritten in place as f16, times 2^q_f16_shift.
    auto q_to_f16 = [&](int n) {
      const float scale =
          q_tile_scale(n, q_chunk, std::integral_constant<int, Sh::kQRowsPerThread>(),
                       [](uint32_t bits) { return q_f16_shift(bits); });
      auto cvt = [&](uint32_t two) {
        const float2 f = bf16x2_to_float2(two);
        return pack_f16x2(f.x * scale, f.y * scale);
      };
#pragma unroll 4
      for (int i = 0; i < Sh::kQRowsPerThread; ++i) {
        uint4* const q = reinterpret_cast<uint4*>(q_chunk(i));
        const uint4 v = *q;
        *q = make_uint4(cvt(v.x), cvt(v.y), cvt(v.z), cvt(v.w));
      }
    };
    // kQSplit: after Q's largest (q_tile_scale), each (row, 16-dim block) rewritten in place as hi
    // and lo, times 2^q_e4m3_shift: hi = e4m3(x), lo = e4m3(x - hi) (x - hi is exact in fp32).
    // Thread tid takes block tid % 8 of rows tid / 8 + 16i.
    auto q_split = [&](int n) {
      if constexpr (Sh::kQSplit) {
        const float scale = q_tile_scale(
            n, [&](int i) { return qs_chunk0 + i * 8 * 128; },  // this thread's copies
            std::integral_constant<int, Sh::kBlockM / 8>(),
            [](uint32_t bits) { return q_e4m3_shift(bits); });
        constexpr int kLoOffset = Sh::kBlockM * 128;  // the lo half: the second column block
        uint8_t* const hi0 =
            smem + operand_offset<Sh::kQRowBytes, true>(tid / 8, tid % 8, Sh::kBlockM);
        // Four bf16 pairs (8 dims) -> their hi codes (two words) and lo codes (two words).
        auto split8 = [&](uint4 v, uint32_t& h0, uint32_t& h1, uint32_t& l0, uint32_t& l1) {
          float x[8];
          const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            const float2 f = bf16x2_to_float2(w[k]);
            x[2 * k] = f.x * scale;
            x[2 * k + 1] = f.y * scale;
          }
          h0 = pack_e4m3x4(x[0], x[1], x[2], x[3]);
          h1 = pack_e4m3x4(x[4], x[5], x[6], x[7]);
          float r[8];
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            const float2 e =
                e4m3x2_to_float2(static_cast<uint16_t>((k < 2 ? h0 : h1) >> (16 * (k % 2))));
            r[2 * k] = x[2 * k] - e.x;
            r[2 * k + 1] = x[2 * k + 1] - e.y;
          }
          l0 = pack_e4m3x4(r[0], r[1], r[2], r[3]);
          l1 = pack_e4m3x4(r[4], r[5], r[6], r[7]);
        };
#pragma unroll 2
        for (int i = 0; i < Sh::kBlockM / 16; ++i) {
          uint8_t* const hi = hi0 + i * 16 * 128;
          const uint4 a = *reinterpret_cast<const uint4*>(hi);              // dims 16m ..
          const uint4 b = *reinterpret_cast<const uint4*>(hi + kLoOffset);  // dims 16m + 8 ..
          uint4 h, l;
          split8(a, h.x, h.y, l.x, l.y);
          split8(b, h.z, h.w, l.z, l.w);
          *reinterpret_cast<uint4*>(hi) = h;
          *reinterpret_cast<uint4*>(hi + kLoOffset) = l;
        }
      }
    };
    auto raw_tile = [&](int J) {  // kRawRing: the raw rows of ring index J
      return smem + Sh::kRawRingOffset + (J % 2) * Sh::kRawTileBytes;
    };
    // This thread's copies of tile j of item n (ring index J) have landed.
    auto finish = [&](int J, int j, int n) {
      // ... and everyone's, where this thread reads rows that others copied
      if constexpr (Sh::kVRowsBytes > 0 || Sh::kRawRing) {
        named_barrier_sync(1, Sh::kProducerThreads);
      }
      stamp(j, kTlBarrier);
      const uint32_t st = stage_addr(J);
      if constexpr (Sh::kFp8Mma) {
        // kApart: V^T of the stage is free once the consumers' P V of ring index J - kStages has
        // landed.
        if (Sh::kQSplit && j == 0) q_split(n);
        if (kApart && J >= kStages) {
          mbarrier_wait(v_empty_bar + 8 * (J % kStages), ((J / kStages) - 1) & 1);
        }
        transpose_v(st);
      } else if constexpr (Sh::kRawRing) {  // K published first, V below (kApart)
        if (Sh::kF16 && j == 0) q_to_f16(n);
        uint8_t* const k_op = smem + (st - base);
        const uint32_t parity = ((J / kStages) - 1) & 1;
        if (J >= kStages) mbarrier_wait(empty_bar + 8 * (J % kStages), parity);
        widen(k_op, raw_tile(J), std::integral_constant<int, 1>());
        fence_proxy_async();
        mbarrier_arrive(full_bar + 8 * (J % kStages));
        if (J >= kStages) mbarrier_wait(v_empty_bar + 8 * (J % kStages), parity);
        widen(k_op + Sh::kKBytes, raw_tile(J) + kBlockN * Sh::kRawPitch,
              std::integral_constant<int, 1>());
      } else if constexpr (Sh::kWiden) {
        if (Sh::kF16 && j == 0) q_to_f16(n);
        uint8_t* const k_op = smem + (st - base);  // K then V operand tiles
        widen(k_op, k_op + Sh::kKBytes + Sh::kVtBytes, std::integral_constant<int, 2>());
      }
      stamp(j, kTlTransformed);
      fence_proxy_async();  // cp.async'd Q/K/V and st.shared V^T or K/V -> the async proxy (wgmma)
      mbarrier_arrive((kApart ? v_full_bar : full_bar) + 8 * (J % kStages));
      stamp(j, kTlPublished);
    };

    if constexpr (kSplitKv) {
      // bf16 K/V, swizzled: no producer work between a copy and its use. Each thread's K rows of
      // tile j are published by the hardware once they (and, for an item's first tile, Q) have
      // landed, then its V rows; a stage's K and V are refilled as soon as the consumers release
      // each. Thread (r0, c) copies 16-byte chunk c of each 128-byte column block of rows r0,
      // r0 + 16, ...: one source address per row (the other paths' mapping, 16 rows a thread at
      // D 128, spilled here at the producer's 72 registers).
      constexpr int kBlocks = Sh::kRowBytes / 128;
      constexpr int kRowsPass = Sh::kProducerThreads / 8;
      constexpr int kRows = kBlockN / kRowsPass;
      static_assert(kBlockN % kRowsPass == 0, "whole passes of 16 rows");
      const int c = tid % 8;
      const int r0 = tid / 8;
      const uint32_t dst0 = r0 * 128 + ((c ^ (r0 % 8)) << 4);
      int ring = 0, n = 0;
      for (int k = 0; kPersistent || k == 0; ++k) {
        const int item = prefill_round_item(k);
        if (item >= num_items) break;
        int head;
        PrefillSeq seq;
        if (!prefill_item(p, item, Sh::kBlockM, head, seq)) continue;
        const int32_t* const slots = request_row<DeviceErrorKind::kPrefillRequest>(p, seq.b);
        if (slots == nullptr) continue;  // every role of the CTA skips it
        const int num_kv_tiles = warp_uniform(seq.last_key / kBlockN + 1);
        const int kv_head = head / kv_group;
        const uint8_t* const kb = p.kv + kv_head * Sh::kKvRowBytes + c * 16;
        const uint8_t* const vb = kb + p.num_kv_heads * Sh::kKvRowBytes;
        int sl[kRows];
        auto fetch = [&](int tile) {
#pragma unroll
          for (int i = 0; i < kRows; ++i) {
            const int pos = tile * kBlockN + r0 + i * kRowsPass;
            sl[i] = pos < seq.seq_len ? slots[pos] : -1;
          }
        };
        auto issue = [&](uint32_t dst, const uint8_t* src_base) {
#pragma unroll
          for (int i = 0; i < kRows; ++i) {
            const bool valid = sl[i] >= 0;
            const uint8_t* const src = src_base + (valid ? sl[i] * slot_bytes : 0);
#pragma unroll
            for (int b = 0; b < kBlocks; ++b) {
              cp_async_16(dst + b * kBlockN * 128 + i * kRowsPass * 128 + dst0, src + b * 128,
                          valid ? 16 : 0);
            }
          }
        };
        // The first tile's slot reads in flight during the wait for the consumers' last S (H200,
        // against Q first: B=16 L=1024 390 -> 402 TFLOP/s, cached prefix 464 -> 474).
        fetch(0);
        issue_q(n, q_source(head, seq), seq.rows);
        for (int j = 0; j < num_kv_tiles; ++j) {
          const int J = ring + j;
          const uint32_t st = stage_addr(J);
          const int s = J % kStages;
          const uint32_t parity = ((J / kStages) - 1) & 1;
          if (J >= kStages) mbarrier_wait(empty_bar + 8 * s, parity);
          issue(st, kb);
          cp_async_mbarrier_arrive(full_bar + 8 * s);
          if (J >= kStages) mbarrier_wait(v_empty_bar + 8 * s, parity);
          issue(st + Sh::kKBytes, vb);
          cp_async_mbarrier_arrive(v_full_bar + 8 * s);
          if (j + 1 < num_kv_tiles) fetch(j + 1);
        }
        ring += num_kv_tiles;
        ++n;
        item_done();
      }
      cp_async_commit();
      cp_async_wait<0>();
      return;
    }
    // Tiles kAhead + 1 deep in flight: tile j's loads are issued before tile j - kAhead is
    // finished (waited for, transposed or widened, published). Where finishing costs work (the
    // V transposition, the widening) and the ring has 4 stages or more, tile j - kAhead is
    // finished first, before the wait for tile j's stage: otherwise the consumers' release of
    // tile j - kStages gates the publication of tile j - kAhead, and they wait for the producer's
    // transposition at every tile (profiled, fp8-per-head D 128: the consumers' wait on `full`
    // 17% of their stall samples, the producer's wait on `empty` a third of its). Finished
    // first, a tile is published a whole consumer iteration before it is needed, with one tile
    // fewer in flight during the wait for its data. An item's last tiles are finished before the
    // next item's loads (its cp.async groups drained). kRawRing: the loads of tile j go to the raw
    // ring, free once every producer thread has widened tile j - 2 out of it; tile j - 1 is
    // finished after they are issued, each operand waiting for its own release there (finish).
    constexpr int kAhead = Sh::kRawRing ? 1 : kStages - 2;
    constexpr bool kFinishFirst = (Sh::kFp8Mma || Sh::kWiden) && kStages >= 4 && !Sh::kRawRing;
    // (kRawRing: finishing tile j - 1 before the loads of tile j would leave one tile in flight.)
    int ring = 0, n = 0;
    for (int k = 0; kPersistent || k == 0; ++k) {
      const int item = prefill_round_item(k);
      if (item >= num_items) break;
      int head;
      PrefillSeq seq;
      if (!prefill_item(p, item, Sh::kBlockM, head, seq)) continue;
      const int32_t* const slots = request_row<DeviceErrorKind::kPrefillRequest>(p, seq.b);
      if (slots == nullptr) continue;  // every role of the CTA skips it
      const int num_kv_tiles = warp_uniform(seq.last_key / kBlockN + 1);
      const int kv_head = head / kv_group;
      const uint8_t* const k_base = p.kv + kv_head * Sh::kKvRowBytes + kv_chunk * 16;
      const int v_bytes = p.num_kv_heads * Sh::kKvRowBytes;  // a slot's K row -> its V row
      int tile_slots[Sh::kKvRowsPerThread];
      auto fetch_slots = [&](int tile) {
#pragma unroll
        for (int i = 0; i < Sh::kKvRowsPerThread; ++i) {
          const int pos = tile * kBlockN + kv_row + i * Sh::kKvRowStep;
          tile_slots[i] = pos < seq.seq_len ? slots[pos] : -1;
        }
      };
      // The first tile's slot reads first (in flight during the wait for the consumers' last S
      // where the CTA is persistent). H200, against Q first: fp8-per-head B=16 L=1024 404 -> 410
      // TFLOP/s, B=4 L=4096 627 -> 635, D 64 469 -> 482 (B=2 L=8192 697 -> 693); fp8-per-tensor
      // 398 -> 406.
      fetch_slots(0);
      issue_q(n, q_source(head, seq), seq.rows);
      for (int j = 0; j < num_kv_tiles; ++j) {
        const int J = ring + j;
        stamp(j, kTlTop);
        if (kFinishFirst && j >= kAhead) {
          cp_async_wait<kAhead - 1>();  // tiles up to j - kAhead have landed
          stamp(j - kAhead, kTlLanded);
          finish(J - kAhead, j - kAhead, n);
        }
        stamp(j, kTlEmptyWait);
        if constexpr (Sh::kRawRing) {
          if (J >= 2) named_barrier_sync(1, Sh::kProducerThreads);
        } else if (J >= kStages) {
          mbarrier_wait(empty_bar + 8 * (J % kStages), ((J / kStages) - 1) & 1);
        }
        stamp(j, kTlEmptyDone);
        const uint32_t st = stage_addr(J);
        uint8_t* const k_stage = smem + (st - base);
        uint8_t* const v_stage =  // raw rows
            Sh::kRawRing ? raw_tile(J) : k_stage + Sh::kKBytes + Sh::kVtBytes;
#pragma unroll
        for (int i = 0; i < Sh::kKvRowsPerThread; ++i) {
          if (kDiag == 1 && j >= kStages) break;
          const int row = kv_row + i * Sh::kKvRowStep;
          if constexpr (Sh::kFp8Mma || (Sh::kWiden && D == 64)) {
            // A row past the request's end (slot -1) is zero-filled from slot 0's address, which
            // it does not read: the ignore-source predicate (one compare), where a source size of
            // `valid ? 16 : 0` and a select of the offset took five instructions a row. (The
            // widened schemes measured faster with it at D 64, slower at D 128 and 256: there
            // they keep the select.)
            const bool skip = tile_slots[i] < 0;
            const int64_t offset = static_cast<int64_t>(max(tile_slots[i], 0)) * slot_bytes;
            if constexpr (Sh::kFp8Mma) {
              cp_async_16_unless(k_stage + canonical(row, kBlockN), k_base + offset, skip);
              cp_async_16_unless(v_stage + (Sh::kQSplit ? raw_offset(row, ld_chunk)
                                                        : row * Sh::kVPitch + ld_chunk * 16),
                                 k_base + offset + v_bytes, skip);
            } else {
              cp_async_16_unless(v_stage + raw_offset(row, kv_chunk), k_base + offset, skip);
              cp_async_16_unless(v_stage + raw_offset(kBlockN + row, kv_chunk),
                                 k_base + offset + v_bytes, skip);
            }
            continue;
          }
          // The widened schemes at D 128 and 256 (bf16, kSplitKv, has returned above).
          const bool valid = tile_slots[i] >= 0;
          const int64_t offset = valid ? tile_slots[i] * slot_bytes : 0;
          if constexpr (Sh::kWiden) {
            cp_async_16(v_stage + raw_offset(row, kv_chunk), k_base + offset, valid ? 16 : 0);
            cp_async_16(v_stage + raw_offset(kBlockN + row, kv_chunk), k_base + offset + v_bytes,
                        valid ? 16 : 0);
          }
        }
        if constexpr (kApart && !Sh::kRawRing) {  // K landed
          cp_async_mbarrier_arrive(full_bar + 8 * (J % kStages));
        }
        cp_async_commit();
        stamp(j, kTlIssued);
        if (j + 1 < num_kv_tiles && !(kDiag == 1 && j + 1 >= kStages)) fetch_slots(j + 1);
        if (!kFinishFirst && j >= kAhead) {
          cp_async_wait<kAhead>();
          stamp(j - kAhead, kTlLanded);
          finish(J - kAhead, j - kAhead, n);
        }
      }
      cp_async_wait<0>();
      for (int j = max(0, num_kv_tiles - kAhead); j < num_kv_tiles; ++j) {
        stamp(j, kTlLanded);
        finish(ring + j, j, n);
      }
      ring += num_kv_tiles;
      ++n;
      item_done();
    }
    return;
  }

  // ================================ consumers ================================
  regs_increase<kConsumerRegs>();
  const int tid = threadIdx.x - Sh::kProducerThreads;
  // The consumer warpgroup (rows cw*64 .. cw*64+63), broadcast from lane 0 so that ptxas sees it
  // warp-uniform: the tile loop and the wgmma descriptors then live in uniform registers.
  const int cw = warp_uniform(tid / 128);
  const int lane = tid % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int wg_row0 = cw * 64;
  // Ping-pong (FA3's scheduler barrier): the warpgroups take turns issuing their wgmmas (named
  // barriers 2 and 3; warpgroup 0 first), so that one's softmax runs while the other's GEMMs hold
  // the tensor pipe. On for bf16 operands, where it measured faster (D 256 on its 64-key tiles:
  // 626 -> 631 TFLOP/s causal; on the 32-key ones it had measured the same or slower); e4m3
  // operands measured the same or slower with it and go without (docs/GPU.md, eighth and ninth
  // sessions). The widened schemes (f16 operands): on at D 64 (fp8-per-tensor, causal B=2
  // L=8192: 304 -> 343 TFLOP/s on the H200) and at D 128 (kRawRing, 128 keys: 487 -> 508 causal,
  // 274 -> 286 at B=16 L=1024, 441 -> 454 at B=4 L=4096, once its producer's widening had got
  // faster; the retired plain 64-key instance went without); off at D 256 (kRawRing too; one CTA
  // per item on 32-key tiles: 431 without, 418 with; the persistent instance, 443 with them, is
  // retired). Each warpgroup
  // takes num_kv_tiles + 1 turns per item (the idle loop's included); warpgroup 1 opens with an
  // arrival on warpgroup 0's barrier and warpgroup 0 closes with a sync that takes warpgroup 1's
  // last hand-over, so the barriers' arrivals balance. Per item, that opening and closing let
  // warpgroup 1 arrive twice on barrier 2 before warpgroup 0's sync when a CTA runs a second item
  // (a deadlock: docs/GPU.md, sixteenth session), so with persistent launches (kTurnsRunOn) they
  // happen once per CTA and the turns run on across its items (FA3's order; racecheck of the
  // smallest persistent launch: 0 hazards in 3 s, where the per-item order did not finish in 380
  // s). kTurnsRunOn follows kPrefillPersistentCtas, so that a one-item launch keeps the per-item
  // order.
  constexpr bool kPingPong = !Sh::kFp8Mma && !(Sh::kWiden && D == 256);
  constexpr bool kTurnsRunOn = kPersistent && kPrefillPersistentCtas;
  if (kPingPong && kTurnsRunOn && cw == 1) named_barrier_arrive(2, 256);
  int ring = 0, n = 0;  // as the producer's
  for (int k = 0; kPersistent || k == 0; ++k) {
    const int item = prefill_round_item(k);
    if (item >= num_items) break;
    int head;
    PrefillSeq seq;
    if (!prefill_item(p, item, Sh::kBlockM, head, seq)) continue;
    // (The producer's check, whose thread 0 records a bad request: every role skips the item.)
    if (request_row<DeviceErrorKind::kPrefillRequest>(p, seq.b) == nullptr) continue;
    const int b = seq.b;
    const int q_begin = seq.q_begin;
    const int q0 = seq.q0;  // first token of this item
    const int prefix = seq.prefix;
    const int rows_here = seq.rows;  // valid rows
    const int num_kv_tiles = warp_uniform(seq.last_key / kBlockN + 1);
    const int kv_head = head / kv_group;
    const bool wg_active = wg_row0 < rows_here;
    // The last key each row sees (PrefillSeq::key_bound: its position, or non-causal the request's
    // last key): tiles past wg_last_pos are skipped, those reaching past wg_first_pos masked.
    const int wg_first_pos = seq.key_bound(prefix + q0 + wg_row0);
    const int wg_last_pos = seq.key_bound(prefix + q0 + min(wg_row0 + 64, rows_here) - 1);
    const int wg_tiles = warp_uniform(wg_active ? wg_last_pos / kBlockN + 1 : 0);
    const int row_g = wg_row0 + ((tid / 32) % 4) * 16 + g;  // this thread's rows: row_g, row_g + 8
    const int row_pos[2] = {seq.key_bound(prefix + q0 + row_g),
                            seq.key_bound(prefix + q0 + row_g + 8)};
    // Scores are raw accumulators; qk_scale turns them into log2 units (the K scale, and Q's for
    // fp8-per-head, folded in); v_scale applies once to the output.
    float qk_scale = p.softmax_scale * kLog2e;
    float v_scale = 1.0f;
    if constexpr (kv_scale_source(S) != KvScaleSource::kNone) {
      const int si = kv_scale_source(S) == KvScaleSource::kPerHead ? kv_head : 0;
      qk_scale *= p.k_scale[si];
      v_scale = p.v_scale[si];
    }
    if constexpr (fp8_q(S)) qk_scale *= p.q_scale[b * p.num_kv_heads + kv_head];
    const uint32_t q_desc_base = base + wg_row0 * (kSwizzle ? 128 : Sh::kRowBytes);

    // The ring's barriers take ring indices J (ring + the item's tile j).
    auto wait_full = [&](int J) { mbarrier_wait(full_bar + 8 * (J % kStages), (J / kStages) & 1); };
    // kApart: full[] is K's alone; V(j) (V^T) is waited for apart. K was published by the
    // hardware, not by a producer thread that fenced: the proxy fence is the consumer's, after the
    // waits and before its wgmmas read it.
    auto wait_v = [&](int J) {
      if constexpr (kApart) mbarrier_wait(v_full_bar + 8 * (J % kStages), (J / kStages) & 1);
    };
    auto fence_apart = [&] {
      if constexpr (kApart) fence_proxy_async();
    };
    auto my_turn = [&] {
      if (kPingPong) named_barrier_sync(2 + cw, 256);
    };
    auto your_turn = [&] {
      if (kPingPong) named_barrier_arrive(2 + (1 - cw), 256);
    };
    // Warpgroup 0 goes first: in each item, or (kTurnsRunOn) once, before the first.
    if (kPingPong && !kTurnsRunOn && cw == 1) named_barrier_arrive(2, 256);
    // The stage (kApart: its K).
    auto release = [&](int J) {
      if (lane == 0) mbarrier_arrive(empty_bar + 8 * (J % kStages));
    };
    auto release_v = [&](int J) {  // kApart: V of the stage
      if (kApart && lane == 0) mbarrier_arrive(v_empty_bar + 8 * (J % kStages));
    };
    auto release_after_pv = [&](int J) {  // once P V(J) has landed: V (kApart) or the whole stage
      if constexpr (kApart) {
        release_v(J);
      } else {
        release(J);
      }
    };
    // Q, once this warpgroup's last S of the item has landed (or at once, without work): the
    // producer refills it for the next item after both warpgroups' warps have arrived.
    auto release_q = [&] {
      if (kPersistent && lane == 0) mbarrier_arrive(q_empty_bar);
    };
    // The descriptors of a tile's k-steps (and of P V's below): the first one's plus the step's
    // byte offset (wgmma_desc_plus: one add, where building each from its address took four).
    // The first k-step descriptor of a K-major operand of QK (Q, K).
    auto k_major_desc = [](uint32_t addr) {
      return kSwizzle ? wgmma_desc_sw128(addr) : wgmma_desc(addr, kCoreBytes, Sh::kKBlockStride);
    };
    const uint64_t q_desc0 = k_major_desc(q_desc_base);
    // k-step kk reads bytes 32kk.. of each row: in the swizzled layout, column block kk / 4 (of
    // [rows][128 bytes]) at byte 32 (kk % 4) of its rows; its offset in a tile of `rows` rows.
    auto k_step_bytes = [](int kk, int rows) {
      return kSwizzle ? (kk / 4) * rows * 128 + (kk % 4) * 32 : kk * 2 * kCoreBytes;
    };
    auto issue_qk = [&](float(&s)[kBlockN / 2], int J) {
      const uint32_t k_addr = stage_addr(J);
      const uint64_t k_desc0 = k_major_desc(k_addr);
#pragma unroll
      for (int kk = 0; kk < Sh::kQkSteps; ++kk) {
        // (kQSplit: k-steps 4.. are lo's, against K's k-steps again)
        const uint64_t da = wgmma_desc_plus(q_desc0, k_step_bytes(kk, Sh::kBlockM));
        const uint64_t db =
            wgmma_desc_plus(k_desc0, k_step_bytes(Sh::kQSplit ? kk % (D / 32) : kk, kBlockN));
        if constexpr (Sh::kFp8Mma) {
          wgmma_ss_first<kBlockN>(s, da, db, kk > 0);
        } else {
          wgmma_ss_first_16bit<Sh::kF16, kBlockN>(s, da, db, kk > 0);
        }
      }
      wgmma_commit();
    };
    // The e4m3 wgmma adds its products into the accumulator at well below fp32 precision: summed
    // into O over a long row, the small p of a diffuse tail vanish beside a large accumulated value
    // (an attention sink: PrefillSink.KernelsKeepTheDiffuseTailOfALongRow measured 0.92 of the
    // output against the twin on an H200, 1.6e-2 promoted).
    // kPromote: each tile's P V starts from zero in pv and is added to O in fp32, so the rounding
    // is relative to one tile's sum; the add and O's rescale are one FFMA, O a tile behind
    // (promote, below). H200, causal B=2 L=8192, the FFMA against an add and a rescale apart: D 128
    // 634 -> 649 TFLOP/s (seventh session), D 64 441.9 -> 464.0 (fourteenth; the seventh had
    // measured it slower there, 445 -> 405, with the kernel of then). kPromote is also the faster
    // form: the P V that starts from zero waits for no rescale of O (docs/GPU.md, thirty-ninth
    // session).
    constexpr bool kPromote = Sh::kFp8Mma && D <= 128;
    // D 256 (e4m3) has no room for a second accumulator set beside S (o alone is 128 registers):
    // kPromoteParts takes the P V in parts of D (kDParts), one after the other, into one
    // part-size set (pv), each added to its part of O in fp32 with O's rescale in the same FFMA
    // as soon as it lands (pv_parts, below), once S of the tile is dead. That P V then runs
    // beside the other warpgroup's work only, not beside this one's next QK.
    constexpr bool kPromoteParts = Sh::kFp8Mma && D == 256;
    // kPairTiles (D 256 e4m3, with kPromoteParts): the 64-key tiles go in pairs. Tile j's fp16
    // exponentials (ph) are held until tile j + 1's softmax has run, scaled to its row max (16
    // HMUL2, where a row of the warp moved), and P of both packed; one P V then covers the 128
    // keys in quarters of D (kDParts: 64 d each, four k-steps over the pair, into a 32-register
    // pv; in halves the consumers spilled 448 bytes at their 224 registers): half the promotion
    // FFMAs a key, the same number of serialized P V waits, and D 128's promotion interval (the
    // attention-sink error 7.5e-3 -> 1.5e-2, bound 2e-2). A pair's V stages are released once
    // its P V has landed; an item's odd last tile goes alone. H200, causal B=2 L=8192, two rounds
    // in turns: 611 / 607 -> 635 / 647 TFLOP/s (docs/GPU.md, fifty-second session).
    constexpr bool kPairTiles = kPromoteParts;
    constexpr int kPaTiles = kPairTiles ? 2 : 1;  // tiles of P in pa
    constexpr int kDParts = kPairTiles ? 4 : 2;   // kPromoteParts' parts of D
    constexpr int kDPart = D / kDParts;           // d of a part
    // 16-bit: B = V [keys][D] MN-major; k-step c = keys 16c..16c+15: two swizzle atoms of 8 keys x
    // 64 d, 1024 bytes apart (64-d blocks [kBlockN][128 bytes] apart).
    // fp8 with kPromote: the sum starts at this tile (the first k-step overwrites o).
    // The descriptor of stage J's V^T (bf16: V) at its first k-step (P V's B operand).
    auto v_desc = [&](int J) {
      const uint32_t vt_addr = stage_addr(J) + Sh::kKBytes;
      if constexpr (!Sh::kFp8Mma) return wgmma_desc_sw128_mn(vt_addr, kBlockN * 128);
      return kSwizzle ? wgmma_desc_sw128(vt_addr)
                      : wgmma_desc(vt_addr, kCoreBytes, Sh::kVtBlockStride);
    };
    auto issue_pv = [&](float(&o)[D / 2], const uint32_t(&pa)[kPaTiles * Sh::kPvSteps][4], int J) {
      const uint64_t v_desc0 = v_desc(J);
#pragma unroll
      for (int c = 0; c < Sh::kPvSteps; ++c) {
        if constexpr (Sh::kFp8Mma) {
          const uint64_t db = wgmma_desc_plus(v_desc0, kSwizzle ? c * 32 : c * 2 * kCoreBytes);
          wgmma_rs<D>(o, pa[c], db, !(kPromote && c == 0));
        } else {
          const uint64_t db = wgmma_desc_plus(v_desc0, c * 2048);  // (swizzled)
          wgmma_rs_16bit<Sh::kF16, D>(o, pa[c], db);
        }
      }
      wgmma_commit();
    };
    RowSoftmax<kBlockN / 8> rows;
    // Masks tile j (where it crosses this warpgroup's diagonal), then the online softmax step.
    // e4m3 P at D 256 and in the one-item D 128 instances: the probabilities as fp16 pairs in ph
    // (RowSoftmax::step_f16: row sums in fp16 pairs, P packed to e4m3 from them; faster there,
    // docs/GPU.md ninth and twenty-first sessions). D 64 and the persistent D 128 instance keep
    // step and P in s: fp32 row sums, and P packed to e4m3 straight from the fp32 exponentials
    // (one convert a pair where the fp16 pairs take two; measured faster there, docs/GPU.md
    // fourteenth, twenty-first and fortieth sessions).
    constexpr bool kF16Softmax = Sh::kFp8Mma && (D == 256 || (D == 128 && !kItemLoop));
    uint32_t ph[kF16Softmax ? kBlockN / 4 : 1];
    // bf16 at D 64 and 128 and the widened schemes at D 64: the tiles after the first take
    // RowSoftmax::step_stale, P at the running max as it stood unless the tile raises it by more
    // than 2^8 (no shuffles in front of the exponentials). Measured faster there; slower for the
    // widened schemes at D 128, bf16 at D 256 and the e4m3 instances (docs/GPU.md, forty-first
    // and forty-second sessions).
    constexpr bool kStaleMax = !Sh::kFp8Mma && (D == 64 || (S == KvScheme::kBf16 && D == 128));
    // P's headroom there, log2: at most 2^8 (bf16 has fp32's range; the widened schemes' f16 P,
    // at p_scale 2^0, has range up to 65504).
    constexpr float kStaleHeadroomLog2 = 8.0f;
    // softmax returns whether a row of the warp may have moved its max: step_stale's vote, and
    // true for step (O's rescale then votes on alpha itself).
    auto softmax = [&](float(&s)[kBlockN / 2], int j, float(&alpha)[2]) {
      const int k0 = j * kBlockN;
      if (k0 + kBlockN - 1 > wg_first_pos) rows.mask(s, k0, t, row_pos);
      bool moved = true;
      if constexpr (kStaleMax) {
        if (j > 0) {
          moved =
              rows.step_stale(s, qk_scale, alpha, p_scale_log2(Sh::kFp8Mma), kStaleHeadroomLog2);
        } else {
          rows.step(s, qk_scale, alpha, p_scale_log2(Sh::kFp8Mma));
        }
      } else if constexpr (kF16Softmax) {
        rows.step_f16(s, qk_scale, alpha, p_scale_log2(Sh::kFp8Mma), ph);
      } else {
        rows.step(s, qk_scale, alpha, p_scale_log2(Sh::kFp8Mma));
      }
      return moved;
    };
    // P (e4m3) for the PV wgmma, in the V^T key order. Only after the previous PV has landed: an rs
    // wgmma reads its A registers while it runs, and ptxas serializes the wgmmas when P's registers
    // are written inside that window.
    // bf16: the 16-bit A fragment of k-step c is the accumulator pairs of n8 tiles 2c and 2c+1
    // (rows g, g+8; keys 2t, 2t+1 and + 8), so P keeps the natural key order.
    // The fp16 exponentials of a tile (ph, or kPairTiles' held ones) into k-steps c0.. of pa.
    auto pack_f16 = [&](const uint32_t(&h_tile)[kF16Softmax ? kBlockN / 4 : 1],
                        uint32_t(&pa)[kPaTiles * Sh::kPvSteps][4], int c0) {
#pragma unroll
      for (int c = 0; c < Sh::kPvSteps; ++c) {
        const uint32_t* h = &h_tile[8 * c];  // n8 tiles 4c .. 4c+3 as fp16 pairs
        pa[c0 + c][0] = pack_e4m3x4_f16(h[0], h[2]);
        pa[c0 + c][1] = pack_e4m3x4_f16(h[1], h[3]);
        pa[c0 + c][2] = pack_e4m3x4_f16(h[4], h[6]);
        pa[c0 + c][3] = pack_e4m3x4_f16(h[5], h[7]);
      }
    };
    auto pack_p = [&](const float(&s)[kBlockN / 2], uint32_t(&pa)[kPaTiles * Sh::kPvSteps][4]) {
      if constexpr (kF16Softmax) {
        pack_f16(ph, pa, 0);
      } else {
#pragma unroll
        for (int c = 0; c < Sh::kPvSteps; ++c) {
          if constexpr (Sh::kFp8Mma) {
            const float* s0 = &s[16 * c];  // n8 tiles 4c .. 4c+3
            pa[c][0] = pack_e4m3x4(s0[0], s0[1], s0[4], s0[5]);
            pa[c][1] = pack_e4m3x4(s0[2], s0[3], s0[6], s0[7]);
            pa[c][2] = pack_e4m3x4(s0[8], s0[9], s0[12], s0[13]);
            pa[c][3] = pack_e4m3x4(s0[10], s0[11], s0[14], s0[15]);
          } else {
            const float* s0 = &s[8 * c];  // n8 tiles 2c, 2c+1
            auto pack = [](float lo, float hi) {
              return Sh::kF16 ? pack_f16x2(lo, hi) : pack_bf16x2(lo, hi);
            };
            pa[c][0] = pack(s0[0], s0[1]);
            pa[c][1] = pack(s0[2], s0[3]);
            pa[c][2] = pack(s0[4], s0[5]);
            pa[c][3] = pack(s0[6], s0[7]);
          }
        }
      }
    };

    float o[D / 2];  // wgmma m64nD accumulators: n8 tile i in o[4i .. 4i+3]
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.0f;
    float pv[kPromote ? D / 2 : kPromoteParts ? kDPart / 2 : 1];
    float(&pv_acc)[D / 2] = pick<kPromote>(pv, o);  // where P V lands
    // kPromote, once the P V of tile j-1 has landed in pv: O is one tile behind the softmax,
    // O = O * alpha(j-1) + pv, one FFMA per accumulator: O held tiles .. j-2 at tile j-2's row max,
    // alpha(j-1) takes it to tile j-1's max, at which P(j-1) was taken (alpha(0) = 0: O starts at
    // 0). Otherwise P V lands in O itself, and O *= alpha(j) (below).
    float alpha_prev[2] = {0.0f, 0.0f};
    auto promote = [&] {
#pragma unroll
      for (int i = 0; i < D / 2; ++i) {
        if constexpr (kPromote) o[i] = fmaf(o[i], alpha_prev[(i >> 1) & 1], pv[i]);
      }
    };
    // kEarlyPv (e4m3 operands): P V(j) is issued as soon as P(j) is packed, at the end of tile
    // j's step, in a commit group of its own, instead of behind QK(j+1) at the top of the next
    // step. ptxas waits for the P V before the softmax either way (it hoists the wait to run the
    // promotion's FFMAs beside the row max: the consumers have no registers to keep the P V in
    // flight through the softmax), so a tile's softmax started only once QK(j) and P V(j-1),
    // issued together, had both run; issued early, P V(j-1) runs while the warpgroup waits for
    // tile j and issues its QK, and S(j) lands one P V sooner. The persistent instances (D 64 and
    // 128); not the one-item D 128 and D 64 instances (the swizzled D 128 one spills with it and
    // measured slower on the uneven cached prefix batch), nor the 16-bit ones (the widened D 256
    // measured slower with it; bf16 takes ping-pong turns around its wgmma issue), nor D 256, whose
    // P V runs in parts of D once P is packed (kPromoteParts). Figures: docs/GPU.md, twenty-ninth
    // session.
    constexpr bool kEarlyPv = Sh::kFp8Mma && kItemLoop;
    if (wg_tiles > 0 && kDiag != 2) {
      uint32_t pa[kPaTiles * Sh::kPvSteps][4];
      float s[kBlockN / 2];
      // kPairTiles: the first tile of a pair, held (its fp16 exponentials and alpha).
      uint32_t ph_held[kPairTiles ? kBlockN / 4 : 1];
      float alpha_held[2];
      auto hold = [&](const float(&alpha)[2]) {
#pragma unroll
        for (int q = 0; q < (kPairTiles ? kBlockN / 4 : 1); ++q) ph_held[q] = ph[q];
        alpha_held[0] = alpha[0];
        alpha_held[1] = alpha[1];
      };
      // P V(J) alone, once P(J) is packed (kEarlyPv: every tile's; otherwise the last one's, in a
      // ping-pong turn of its own).
      auto issue_pv_alone = [&](int J) {
        wait_v(J);
        fence_apart();
        my_turn();
        fence_operands(pv_acc);
        wgmma_fence();
        issue_pv(pv_acc, pa, J);
        your_turn();
      };
      // kPromoteParts: P V of tiles J .. J + kT - 1 (kT = `tiles`: 1, or 2 for a pair) for each
      // part of D in turn, each into pv from zero and added to its part of O once landed,
      // O = O * alpha + pv (alpha takes O from the previous tiles' row max to the last tile's, at
      // which P was taken; alpha of the first tile is 0).
      auto pv_parts = [&](int J, auto tiles, const float(&alpha)[2]) {
        if constexpr (kPromoteParts) {
          constexpr int kT = decltype(tiles)::value;
#pragma unroll
          for (int u = 0; u < kT; ++u) wait_v(J + u);
          fence_apart();
          uint64_t v_desc0[kT];  // D 256 e4m3: no swizzle
#pragma unroll
          for (int u = 0; u < kT; ++u) v_desc0[u] = v_desc(J + u);
#pragma unroll
          for (int h = 0; h < kDParts; ++h) {
            fence_operands(pv);
            wgmma_fence();
#pragma unroll
            for (int u = 0; u < kT; ++u) {
#pragma unroll
              for (int c = 0; c < Sh::kPvSteps; ++c) {
                // d rows kDPart * h on: kDPart / 8 groups of 8 d rows, kVtBlockStride apart.
                const uint64_t db = wgmma_desc_plus(
                    v_desc0[u], h * (kDPart / 8) * Sh::kVtBlockStride + c * 2 * kCoreBytes);
                wgmma_rs<kDPart>(pv, pa[u * Sh::kPvSteps + c], db, u > 0 || c > 0);
              }
            }
            wgmma_commit();
            wgmma_wait<0>();
            fence_operands(pv);
#pragma unroll
            for (int i = 0; i < kDPart / 2; ++i) {
              o[h * (kDPart / 2) + i] = fmaf(o[h * (kDPart / 2) + i], alpha[(i >> 1) & 1], pv[i]);
            }
          }
#pragma unroll
          for (int u = 0; u < kT; ++u) release_after_pv(J + u);
        }
      };
      // kPairTiles, at tile j's end (J its ring index, alpha its softmax's): the first of a pair
      // is held, the second's P V covers both, and an odd last tile goes alone.
      auto pair_step = [&](int j, int J, const float(&alpha)[2], bool odd) {
        if constexpr (kPairTiles) {
          if (!odd && j + 1 < wg_tiles) {
            hold(alpha);
          } else if (!odd) {
            pack_p(s, pa);
            pv_parts(J, std::integral_constant<int, 1>(), alpha);
          } else {
            if (__any_sync(kFullMask, alpha[0] != 1.0f || alpha[1] != 1.0f)) {
              const __half2 a[2] = {__float2half2_rn(alpha[0]), __float2half2_rn(alpha[1])};
#pragma unroll
              for (int q = 0; q < kBlockN / 4; ++q) {  // ph's pair q is of row q % 2
                __half2 x = *reinterpret_cast<const __half2*>(&ph_held[q]);
                x = __hmul2(x, a[q % 2]);
                ph_held[q] = *reinterpret_cast<const uint32_t*>(&x);
              }
            }
            pack_f16(ph_held, pa, 0);
            pack_f16(ph, pa, Sh::kPvSteps);
            const float alpha_pair[2] = {alpha_held[0] * alpha[0], alpha_held[1] * alpha[1]};
            pv_parts(J - 1, std::integral_constant<int, 2>(), alpha_pair);
          }
        }
      };
      {
        stamp(0, kTlTop);
        wait_full(ring);
        fence_apart();
        if constexpr (Sh::kF16) {  // Q was stored times 2^shift (q_to_f16), published with tile 0
          qk_scale *= exp2_int(
              -q_f16_shift(reinterpret_cast<volatile uint32_t*>(smem + Sh::kQMaxOffset)[n & 1]));
        } else if constexpr (Sh::kQSplit) {  // (q_split)
          qk_scale *= exp2_int(
              -q_e4m3_shift(reinterpret_cast<volatile uint32_t*>(smem + Sh::kQMaxOffset)[n & 1]));
        }
        stamp(0, kTlFull);
        my_turn();
        wgmma_fence();
        issue_qk(s, ring);
        your_turn();
        stamp(0, kTlIssued);
        wgmma_wait<0>();
        fence_operands(s);
        if (wg_tiles == 1) release_q();
        if constexpr (kApart) release(ring);
        stamp(0, kTlScores);
        softmax(s, 0, alpha_prev);
        stamp(0, kTlSoftmax);
        if constexpr (kPairTiles) {
          pair_step(0, ring, alpha_prev, false);
        } else {
          pack_p(s, pa);
          stamp(0, kTlPacked);
          if constexpr (kEarlyPv) issue_pv_alone(ring);
          pv_parts(ring, std::integral_constant<int, 1>(), alpha_prev);
        }
      }
      // Tiles 1.. of the warpgroup's item; kPairTiles: in pairs (tiles jp and jp + 1), the inner
      // loop unrolled so that `odd` (the second of a pair) is known at compile time there and the
      // held tile's registers are live only within a pair.
      constexpr int kTileStep = kPairTiles ? 2 : 1;
      for (int jp = 1; jp < wg_tiles; jp += kTileStep) {
#pragma unroll
        for (int u = 0; u < kTileStep; ++u) {
          const int j = jp + u;
          if (kPairTiles && j >= wg_tiles) break;
          const bool odd = kPairTiles && u == 0;
          stamp(j, kTlTop);
          const int J = ring + j;
          wait_full(J);
          // P V(j - 1) issued with QK(j): not where it was issued early or has run (kEarlyPv,
          // kPromoteParts).
          constexpr bool kPvWithQk = !kEarlyPv && !kPromoteParts;
          if constexpr (kPvWithQk) wait_v(J - 1);
          fence_apart();
          stamp(j, kTlFull);
          my_turn();
          if constexpr (kPvWithQk) fence_operands(pv_acc);
          wgmma_fence();
          issue_qk(s, J);
          if constexpr (kPvWithQk) issue_pv(pv_acc, pa, J - 1);
          your_turn();
          stamp(j, kTlIssued);
          if constexpr (kPromoteParts) {
            wgmma_wait<0>();  // S of tile j
          } else if constexpr (kEarlyPv) {
            wgmma_wait<0>();  // S of tile j, and the P V of tile j - 1 issued before it
            fence_operands(pv_acc);
          } else {
            wgmma_wait<1>();  // S of tile j; the PV of tile j-1 may still run
          }
          fence_operands(s);
          if (j == wg_tiles - 1) release_q();
          if constexpr (kApart) release(J);
          stamp(j, kTlScores);
          float alpha[2];
          const bool moved = softmax(s, j, alpha);
          // The persistent D 128 instance packs P before the promotion: P V(j-1), which read pa,
          // has landed (kEarlyPv), and pa then takes the exponentials as they come.
          constexpr bool kPackEarly = kEarlyPv && !kF16Softmax && D == 128;
          if constexpr (kPackEarly) pack_p(s, pa);
          stamp(j, kTlSoftmax);
          if constexpr (kPvWithQk) {
            wgmma_wait<0>();
            fence_operands(pv_acc);
          }
          stamp(j, kTlPv);
          if constexpr (!kPromoteParts) {
            release_after_pv(J - 1);
            promote();
          }
          if constexpr (kPromote) {
            alpha_prev[0] = alpha[0];
            alpha_prev[1] = alpha[1];
          } else if (!kPromoteParts &&  // (kPromoteParts: O's rescale is in pv_parts' FFMA)
                     (kStaleMax ? moved
                                : __any_sync(kFullMask, alpha[0] != 1.0f || alpha[1] != 1.0f))) {
            // Where no row of the warp raised its max (alpha 1: common once the rows have seen
            // their largest scores) the rescale is the identity: skipped, bit for bit the same O.
            // The stale-max instances take step_stale's vote, the same decision without a second
            // vote.
#pragma unroll
            for (int i = 0; i < D / 2; ++i) o[i] *= alpha[(i >> 1) & 1];
          }
          if constexpr (kPairTiles) {
            pair_step(j, J, alpha, odd);
          } else {
            if constexpr (!kPackEarly) pack_p(s, pa);
            stamp(j, kTlPacked);
            if constexpr (kEarlyPv) issue_pv_alone(J);
            pv_parts(J, std::integral_constant<int, 1>(), alpha);
          }
        }
      }
      if constexpr (!kPromoteParts) {  // the last tile's P V (kPromoteParts: done)
        if constexpr (!kEarlyPv) issue_pv_alone(ring + wg_tiles - 1);
        wgmma_wait<0>();
        fence_operands(pv_acc);
        release_after_pv(ring + wg_tiles - 1);
        promote();
      }
    } else {
      // Not before the item's Q is published (with its first tile): an arrival ahead of it would
      // count for the previous item, whose Q the other warpgroup may still be reading.
      if constexpr (kPersistent) {
        wait_full(ring);
        release_q();
      }
    }
    // Tiles past this warpgroup's last row (the other one's diagonal): keep the ring turning.
    const int first_idle = (wg_tiles == 0 || kDiag == 2) ? 0 : wg_tiles;
    for (int j = first_idle; j < num_kv_tiles; ++j) {
      wait_full(ring + j);
      wait_v(ring + j);
      my_turn();
      your_turn();
      release(ring + j);
      release_v(ring + j);
    }
    if (kPingPong) {
      if (first_idle == 0) {  // no GEMM turns were taken: the one more a working warpgroup takes
        my_turn();
        your_turn();
      }
      if (cw == 0 && !kTurnsRunOn) my_turn();  // warpgroup 1's last hand-over
    }
    ring += num_kv_tiles;
    ++n;
    item_done();
    if (!wg_active) continue;

    // ---- epilogue ----
    float out_scales[2];
    rows.finish(v_scale, out_scales);
    // Rows g (r 0) and g + 8 (r 1). D >= 128: in each group of 4 n8 tiles lane t stores tile
    // 4k + t's 8 columns, 16 bytes (quad_transpose4), where a 4-byte store a tile made 4x the L2
    // requests and held the consumers up at every item's end (docs/GPU.md, thirty-eighth
    // session). D 64 keeps the 4-byte stores, which measured faster there.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = row_g + 8 * r;
      if constexpr (D < 128) {
        if (row >= rows_here) continue;
      }
      const float out_scale = out_scales[r];
      uint16_t* const out =
          p.o + (static_cast<int64_t>(q_begin + q0 + row) * p.num_q_heads + head) * D;
      auto word = [&](int i) {  // n8 tile i's two columns of this row, this lane's
        return pack_bf16x2(o[4 * i + 2 * r] * out_scale, o[4 * i + 2 * r + 1] * out_scale);
      };
      if constexpr (D < 128) {
#pragma unroll
        for (int i = 0; i < D / 8; ++i) *reinterpret_cast<uint32_t*>(out + i * 8 + 2 * t) = word(i);
      } else {
#pragma unroll
        for (int k = 0; k < D / 32; ++k) {
          const uint32_t x[4] = {word(4 * k), word(4 * k + 1), word(4 * k + 2), word(4 * k + 3)};
          uint32_t y[4];
          quad_transpose4(x, t, y);  // every lane: the shuffles' full mask
          if (row < rows_here) {
            *reinterpret_cast<uint4*>(out + 8 * (4 * k + t)) = make_uint4(y[0], y[1], y[2], y[3]);
          }
        }
      }
    }
  }
  if (kPingPong && kTurnsRunOn && cw == 0) named_barrier_sync(2, 256);  // the last hand-over
}

template <KvScheme S, int D, int kBlockN, int kStages, bool kSwizzle, int kDiag, bool kItemLoop>
void launch_prefill_ws(const AttentionParams& a, cudaStream_t stream, DeviceError* error) {
  using Sh = WsShape<S, D, kBlockN, kStages>;
  PrefillParams p = make_prefill_params(a, error);
  constexpr bool kPersistent = (Sh::kSplitKvOperands && kSwizzle) || kItemLoop;  // the kernel's
  const dim3 grid = prefill_item_grid(a, Sh::kBlockM, kPersistent, p);
  auto kernel = prefill_ws_kernel<S, D, kBlockN, kStages, kSwizzle, kDiag, kItemLoop>;
  FP8KV_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Sh::kSmemBytes));
  kernel<<<grid, Sh::kThreads, Sh::kSmemBytes, stream>>>(p);
  FP8KV_CUDA_CHECK_LAUNCH("prefill_attention");
}

}  // namespace fp8kv::cuda::prefill
