// Prefill attention on Hopper with mma.sync tensor cores: varlen batches, causal with a cached
// prefix or non-causal, GQA, K/V gathered from the token-slot pool. One kernel template for every
// scheme:
//
//   kBf16          bf16 Q, K, V; QK^T and PV as m16n8k16 bf16 MMAs, fp32 accumulate.
//   kFp8PerTensor  bf16 Q; e4m3 K/V are widened to bf16 in shared memory (exact: e4m3 is a subset
//                  of bf16) and run the bf16 MMAs; k_scale folds into the softmax scale, v_scale
//                  into the final normalization, so only a cast is needed per element.
//   kFp8E5m2, kFp8PerHeadBf16Q  the same path with another KV codec or scale source
//                  (SchemeTraits): e5m2 K/V (also a subset of bf16) with scale 1, or e4m3 K/V
//                  with the KV head's K and V scales.
//   kFp8PerHead    e4m3 Q (quantize_q) and K/V; QK^T and PV as m16n8k32 e4m3 MMAs (on sm_90 ptxas
//                  runs these as fp16 HMMAs after unpacking: correct, no FP8 rate; the fast
//                  fp8-per-head path is prefill_ws.cuh, this one stays as its simple twin). The
//                  scales fold the same way: S = acc * q_scale * k_scale * sm_scale, O = acc *
//                  v_scale / l. P is rounded to e4m3 as it is (no P scale) for the PV product and
//                  the row sum l is kept in fp32 from the unrounded P: the CPU twin's semantics
//                  (cpu_backend.cpp). Every KV tile's PV product lands in the fp32 mma
//                  accumulators, so tiles add in fp32 (no FA3-style single-level fp8 accumulation).
//
// CTA: kWarps warps, 16 query rows each (kBlockM = 16 * kWarps rows of one query head of one
// request); grid (Hq, B, q tiles), the q tile index reversed so the longest causal rows start
// first. KV tiles of kBlockN keys go through a double-buffered cp.async pipeline: while tile j is
// computed, tile j+1 is in flight and the slot indices of tile j+2 are being read. Tiles past the
// CTA's last query position are never loaded; the causal mask is applied only on tiles that cross
// the diagonal of a warp's rows, and a warp skips the MMAs of tiles wholly above its diagonal.
// Non-causal (p.causal false), every row's "diagonal" is the request's last key (PrefillSeq::
// key_bound): all key tiles are loaded and computed, and only the last one, where it runs past
// seq_len, is masked.
//
// Online softmax in base 2: scores are kept raw (the mma accumulator) and the scale, with kLog2e
// folded in, is applied inside one fma per element: p = exp2(acc * scale - max * scale).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "fp8kv/backend.h"
#include "fp8kv/scheme.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/prefill_common.cuh"

namespace fp8kv::cuda::prefill {

// What a scheme means for this kernel, from its three choices (fp8kv/scheme.h).
template <KvScheme S>
struct SchemeTraits {
  static constexpr KvCodec kCodec = kv_codec(S);     // how K/V are stored
  static constexpr int kQBytes = fp8_q(S) ? 1 : 2;   // bytes of one stored Q element
  static constexpr int kKvBytes = kv_elem_bytes(S);  // bytes of one stored K/V element
  static constexpr bool kFp8Mma = fp8_q(S);          // e4m3 tensor cores for QK^T and PV
  // FP8 K/V widened to bf16 in shared memory for the bf16 MMAs (bf16 Q)
  static constexpr bool kWidenKv = !fp8_q(S) && kCodec != KvCodec::kBf16;
  static constexpr bool kScaled = kv_scale_source(S) != KvScaleSource::kNone;  // K/V scales apply
  static constexpr bool kPerHeadScales = kv_scale_source(S) == KvScaleSource::kPerHead;
  static_assert(!kFp8Mma || kCodec == KvCodec::kE4m3, "the fp8 MMAs read e4m3 K/V");
};

// Sizes of one kernel instance. Shared memory rows are padded by one 16-byte chunk: the 8 rows
// one ldmatrix phase reads then fall into 8 distinct 16-byte bank groups (conflict-free).
template <KvScheme S, int D, int kWarps, int kBlockN>
struct TileShape {
  using Traits = SchemeTraits<S>;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBlockM = kWarps * 16;                 // query rows per CTA
  static constexpr int kMmaBytes = Traits::kFp8Mma ? 1 : 2;   // bytes of an MMA operand element
  static constexpr int kQPitch = D * Traits::kQBytes + 16;    // Q tile row, bytes
  static constexpr int kKvPitch = D * Traits::kKvBytes + 16;  // K/V tile row as loaded
  static constexpr int kMmaPitch = D * kMmaBytes + 16;        // K/V tile row as the MMAs read it
  static constexpr int kQTileBytes = kBlockM * kQPitch;
  static constexpr int kStageBytes = 2 * kBlockN * kKvPitch;  // K rows then V rows of one tile
  static constexpr int kWideBytes = Traits::kWidenKv ? 2 * kBlockN * kMmaPitch : 0;
  static constexpr int kSmemBytes = kQTileBytes + 2 * kStageBytes + kWideBytes;
  static constexpr int kKSteps = D * kMmaBytes / 32;  // QK^T k-steps: 32 bytes of D each
  static constexpr int kSTiles = kBlockN / 8;         // n8 tiles of S per warp
  static constexpr int kOTiles = D / 8;               // n8 tiles of O per warp
  static constexpr bool kQInRegs = D <= 128;          // D = 256 re-reads Q from shared memory
  static constexpr int kKvChunks = D * Traits::kKvBytes / 16;  // 16-byte chunks per K/V row
  static constexpr int kKvRowsPerThread = kBlockN * kKvChunks / kThreads;
  static constexpr int kQChunks = D * Traits::kQBytes / 16;
  static_assert(kThreads % kKvChunks == 0 && (kBlockN * kKvChunks) % kThreads == 0,
                "K/V tile rows must split evenly over the threads");
  static_assert(kThreads % kQChunks == 0 && (kBlockM * kQChunks) % kThreads == 0,
                "Q tile rows must split evenly over the threads");
  static_assert(kBlockN % 32 == 0, "the fp8 PV product consumes keys 32 at a time");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory of one CTA exceeds Hopper's limit");
};

// Tensor-core building blocks (smem_addr, ldmatrix_x4, mma_bf16, mma_e4m3): common.cuh.

// fast_exp2, pack_bf16x2, pack_e4m3x4, fp8x2_to_bf16x2, RowSoftmax: prefill_common.cuh.

// ---- the kernel ----------------------------------------------------------------------------
//
// MMA fragment layouts (PTX ISA, mma.m16n8k16 / m16n8k32), lane = 4 * g + t:
//   A (16 x 32 bytes): a0 row g, bytes 4t..4t+3; a1 row g+8; a2 row g, bytes 16+4t..; a3 row g+8.
//   B (32 bytes x 8):  b0 column g, bytes 4t..4t+3; b1 bytes 16+4t..
//   C (16 x 8 fp32):   c0, c1 row g, columns 2t, 2t+1; c2, c3 row g+8.
// In bytes the bf16 k16 and the e4m3 k32 fragments are the same, so one ldmatrix addressing
// serves both for Q and K. PV differs:
//   bf16: P's A fragment is the S accumulators of two n8 tiles, as FA2; V via ldmatrix.trans.
//   e4m3: the S accumulators of four n8 tiles hold, for row g, keys {2t, 2t+1, 2t+8, 2t+9} and
//     16 + those; the PV contraction runs over keys in that permuted order (a sum does not care),
//     so P's A fragment is a plain repacking. V's B fragment must hold one d column and the same
//     four keys: ldmatrix.trans on V rows (b16 view: pairs of d) gives lane (g, t) the bytes
//     V[2t][2g], V[2t][2g+1], V[2t+1][2g], V[2t+1][2g+1] (and keys +8 from the next matrix);
//     two byte permutes split them into the fragment for d = 2g (one n8 tile) and d = 2g+1
//     (another). So a 16-byte column block of V feeds two n8 tiles of O whose columns are the
//     even and the odd d: lane t ends up owning d = 4t..4t+3 of each 16-d block.
template <KvScheme S, int D, int kWarps, int kBlockN>
__global__ void __launch_bounds__(kWarps * 32, 1) prefill_kernel(const PrefillParams p) {
  using Shape = TileShape<S, D, kWarps, kBlockN>;
  using Traits = SchemeTraits<S>;
  constexpr int kThreads = Shape::kThreads;
  constexpr int kBlockM = Shape::kBlockM;
  constexpr int kQPitch = Shape::kQPitch;
  constexpr int kKvPitch = Shape::kKvPitch;
  constexpr int kMmaPitch = Shape::kMmaPitch;

  extern __shared__ __align__(128) uint8_t smem[];
  uint8_t* const q_smem = smem;                        // [kBlockM][kQPitch]
  uint8_t* const kv_smem = smem + Shape::kQTileBytes;  // [2 stages][K, V][kBlockN][kKvPitch]
  uint8_t* const wide_smem = kv_smem + 2 * Shape::kStageBytes;  // [K, V][kBlockN][kMmaPitch]

  PrefillSeq seq;
  if (!prefill_seq(p, kBlockM, 1, seq)) return;  // past this request's new tokens
  const int head = blockIdx.x;
  const int b = seq.b;
  const int q_begin = seq.q_begin;
  const int q0 = seq.q0;
  const int seq_len = seq.seq_len;
  const int prefix = seq.prefix;
  const int kv_head = head / (p.num_q_heads / p.num_kv_heads);
  const int32_t* const slots = request_row<DeviceErrorKind::kPrefillRequest>(p, b);
  if (slots == nullptr) return;  // the same for every thread of the CTA: before any barrier

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int rows_here = seq.rows;
  const int num_kv_tiles = seq.last_key / kBlockN + 1;
  const int warp_row0 = warp * 16;
  const bool warp_active = warp_row0 < rows_here;
  const int warp_first_pos = prefix + q0 + warp_row0;
  // The last key the warp's first / last row sees: tiles past warp_last_key are skipped, those
  // reaching past warp_first_key are masked.
  const int warp_first_key = seq.key_bound(warp_first_pos);
  const int warp_last_key = seq.key_bound(prefix + q0 + min(warp_row0 + 16, rows_here) - 1);

  // Scores are raw accumulators; qk_scale turns them into log2 units.
  float qk_scale = p.softmax_scale * kLog2e;
  float v_scale = 1.0f;
  if constexpr (Traits::kScaled) {
    const int si = Traits::kPerHeadScales ? kv_head : 0;
    qk_scale *= p.k_scale[si];
    v_scale = p.v_scale[si];
  }
  if constexpr (fp8_q(S)) {
    qk_scale *= p.q_scale[b * p.num_kv_heads + kv_head];
  }

  // ---- Q tile: rows past q_len are zero-filled ----
  {
    constexpr int kChunks = Shape::kQChunks;
    const int64_t token_bytes = static_cast<int64_t>(p.num_q_heads) * D * Traits::kQBytes;
    const uint8_t* q_base =
        static_cast<const uint8_t*>(p.q) +
        (static_cast<int64_t>(q_begin + q0) * p.num_q_heads + head) * D * Traits::kQBytes;
    const int col = tid % kChunks;
#pragma unroll
    for (int i = 0; i < kBlockM * kChunks / kThreads; ++i) {
      const int r = tid / kChunks + i * (kThreads / kChunks);
      const bool valid = r < rows_here;
      cp_async_16(q_smem + r * kQPitch + col * 16,
                  valid ? q_base + r * token_bytes + col * 16 : p.q, valid ? 16 : 0);
    }
  }

  // ---- K/V tile loads through the slot indirection ----
  constexpr int kKvChunks = Shape::kKvChunks;
  constexpr int kLoadRows = Shape::kKvRowsPerThread;
  constexpr int kLoadRowStep = kThreads / kKvChunks;
  const int load_col = tid % kKvChunks;
  const int load_row = tid / kKvChunks;
  const int64_t head_bytes = static_cast<int64_t>(D) * Traits::kKvBytes;
  const int64_t slot_bytes = 2 * p.num_kv_heads * head_bytes;
  const uint8_t* const k_base = p.kv + kv_head * head_bytes + load_col * 16;
  const uint8_t* const v_base = k_base + p.num_kv_heads * head_bytes;
  int tile_slots[kLoadRows];  // slots of this thread's rows of the next tile to issue; -1: none

  auto fetch_slots = [&](int tile) {
#pragma unroll
    for (int i = 0; i < kLoadRows; ++i) {
      const int pos = tile * kBlockN + load_row + i * kLoadRowStep;
      tile_slots[i] = pos < seq_len ? slots[pos] : -1;
    }
  };
  // Keys past seq_len are zero-filled: their scores are masked, and zeros (never NaN) times a
  // zero probability keep the PV product finite.
  auto issue_tile = [&](int tile) {
    uint8_t* stage = kv_smem + (tile & 1) * Shape::kStageBytes;
#pragma unroll
    for (int i = 0; i < kLoadRows; ++i) {
      const int row = load_row + i * kLoadRowStep;
      const bool valid = tile_slots[i] >= 0;
      const int64_t offset = valid ? tile_slots[i] * slot_bytes : 0;
      cp_async_16(stage + row * kKvPitch + load_col * 16, k_base + offset, valid ? 16 : 0);
      cp_async_16(stage + (kBlockN + row) * kKvPitch + load_col * 16, v_base + offset,
                  valid ? 16 : 0);
    }
  };

  fetch_slots(0);
  issue_tile(0);
  cp_async_commit();  // group: Q and KV tile 0
  if (num_kv_tiles > 1) fetch_slots(1);

  // ---- per-warp state ----
  const int g = lane / 4;    // fragment row group
  const int t = lane % 4;    // thread in group
  const int mat = lane / 8;  // the 8x8 matrix whose row address this lane supplies to ldmatrix
  const int mat_row = lane % 8;
  float o_acc[Shape::kOTiles][4];
#pragma unroll
  for (int i = 0; i < Shape::kOTiles; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) o_acc[i][e] = 0.0f;
  }
  RowSoftmax<Shape::kSTiles> softmax;  // rows g and g + 8 of this warp
  const int row_pos[2] = {warp_first_pos + g, warp_first_pos + g + 8};  // causal mask bounds

  // Shared-memory addresses as 32-bit offsets: constant offsets then fold into the ldmatrix
  // immediates instead of occupying registers.
  const uint32_t smem_base = smem_addr(smem);
  // Q fragment of k-step kk: matrices (rows 0-7 | 8-15) x (bytes 0-15 | 16-31).
  const uint32_t q_frag_row =
      smem_base + (warp_row0 + (mat & 1) * 8 + mat_row) * kQPitch + (mat >> 1) * 16;
  uint32_t q_frag[Shape::kQInRegs ? Shape::kKSteps : 1][4];

  for (int j = 0; j < num_kv_tiles; ++j) {
    cp_async_wait<0>();
    __syncthreads();  // tile j landed for all threads; all warps are done with tile j-1
    if (j + 1 < num_kv_tiles) issue_tile(j + 1);
    cp_async_commit();
    if (j + 2 < num_kv_tiles) fetch_slots(j + 2);

    if constexpr (Shape::kQInRegs) {
      if (j == 0) {
#pragma unroll
        for (int kk = 0; kk < Shape::kKSteps; ++kk) ldmatrix_x4(q_frag[kk], q_frag_row + kk * 32);
      }
    }

    const uint8_t* k_tile = kv_smem + (j & 1) * Shape::kStageBytes;
    if constexpr (Traits::kWidenKv) {
      // e4m3 / e5m2 -> bf16 for the whole tile, once per CTA (not once per warp).
      constexpr KvCodec kCodec = Traits::kCodec;
      constexpr int kChunks = D / 16;  // 16 codes per chunk
#pragma unroll 4
      for (int idx = tid; idx < 2 * kBlockN * kChunks; idx += kThreads) {
        const int row = idx / kChunks;  // K rows, then V rows
        const int col = idx % kChunks;
        const uint4 codes = *reinterpret_cast<const uint4*>(k_tile + row * kKvPitch + col * 16);
        uint4 w0, w1;
        fp8x16_to_16bit<kCodec>(codes, w0, w1);
        uint8_t* dst = wide_smem + row * kMmaPitch + col * 32;
        *reinterpret_cast<uint4*>(dst) = w0;
        *reinterpret_cast<uint4*>(dst + 16) = w1;
      }
      __syncthreads();
      k_tile = wide_smem;
    }
    const uint32_t k_tile_addr = smem_base + static_cast<uint32_t>(k_tile - smem);
    const uint32_t v_tile_addr = k_tile_addr + kBlockN * kMmaPitch;

    const int k0 = j * kBlockN;
    if (!warp_active || k0 > warp_last_key) continue;  // nothing of this tile is visible

    // ---- S = Q K^T ----
    float s[Shape::kSTiles][4];
#pragma unroll
    for (int i = 0; i < Shape::kSTiles; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[i][e] = 0.0f;
    }
    // K fragments for n8 tiles (2np, 2np+1): matrices (keys 0-7 | 8-15) x (bytes 0-15 | 16-31).
    const uint32_t k_frag_row =
        k_tile_addr + ((mat >> 1) * 8 + mat_row) * kMmaPitch + (mat & 1) * 16;
#pragma unroll
    for (int kk = 0; kk < Shape::kKSteps; ++kk) {
      uint32_t a[4];
      if constexpr (Shape::kQInRegs) {
#pragma unroll
        for (int e = 0; e < 4; ++e) a[e] = q_frag[kk][e];
      } else {
        ldmatrix_x4(a, q_frag_row + kk * 32);
      }
#pragma unroll
      for (int np = 0; np < Shape::kSTiles / 2; ++np) {
        uint32_t bk[4];
        ldmatrix_x4(bk, k_frag_row + np * 16 * kMmaPitch + kk * 32);
        if constexpr (Traits::kFp8Mma) {
          mma_e4m3(s[2 * np], a, bk[0], bk[1]);
          mma_e4m3(s[2 * np + 1], a, bk[2], bk[3]);
        } else {
          mma_bf16(s[2 * np], a, bk[0], bk[1]);
          mma_bf16(s[2 * np + 1], a, bk[2], bk[3]);
        }
      }
    }

    // ---- mask, only where the tile crosses this warp's diagonal (non-causal: seq_len);
    // online softmax ----
    auto& s_flat = reinterpret_cast<float(&)[4 * Shape::kSTiles]>(s);
    if (k0 + kBlockN - 1 > warp_first_key) {
      if (seq.causal) {
        softmax.mask(s_flat, k0, t, row_pos);
      } else {
        softmax.mask(s_flat, k0, t, seq_len - 1);
      }
    }
    float alpha[2];
    softmax.step(s_flat, qk_scale, alpha, p_scale_log2(S));
#pragma unroll
    for (int i = 0; i < Shape::kOTiles; ++i) {
      o_acc[i][0] *= alpha[0];
      o_acc[i][1] *= alpha[0];
      o_acc[i][2] *= alpha[1];
      o_acc[i][3] *= alpha[1];
    }

    // ---- O += P V ----
    if constexpr (Traits::kFp8Mma) {
      // V matrices: keys (0-7 | 8-15 | 16-23 | 24-31) of the chunk, one 16-byte column block.
      const uint32_t v_frag_row = v_tile_addr + (mat * 8 + mat_row) * kMmaPitch;
#pragma unroll
      for (int c = 0; c < kBlockN / 32; ++c) {
        uint32_t a[4];
        a[0] = pack_e4m3x4(s[4 * c][0], s[4 * c][1], s[4 * c + 1][0], s[4 * c + 1][1]);
        a[1] = pack_e4m3x4(s[4 * c][2], s[4 * c][3], s[4 * c + 1][2], s[4 * c + 1][3]);
        a[2] = pack_e4m3x4(s[4 * c + 2][0], s[4 * c + 2][1], s[4 * c + 3][0], s[4 * c + 3][1]);
        a[3] = pack_e4m3x4(s[4 * c + 2][2], s[4 * c + 2][3], s[4 * c + 3][2], s[4 * c + 3][3]);
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          uint32_t r[4];
          ldmatrix_x4_trans(r, v_frag_row + c * 32 * kMmaPitch + dp * 16);
          // Even d of the block: bytes 0 and 2 of each pair of keys; odd d: bytes 1 and 3.
          mma_e4m3(o_acc[2 * dp], a, __byte_perm(r[0], r[1], 0x6420),
                   __byte_perm(r[2], r[3], 0x6420));
          mma_e4m3(o_acc[2 * dp + 1], a, __byte_perm(r[0], r[1], 0x7531),
                   __byte_perm(r[2], r[3], 0x7531));
        }
      }
    } else {
      // V matrices: (keys 0-7 | 8-15) x (d 0-7 | 8-15) of a 16 x 16 block, transposed.
      const uint32_t v_frag_row =
          v_tile_addr + ((mat & 1) * 8 + mat_row) * kMmaPitch + (mat >> 1) * 16;
#pragma unroll
      for (int c = 0; c < kBlockN / 16; ++c) {
        uint32_t a[4];
        a[0] = pack_bf16x2(s[2 * c][0], s[2 * c][1]);
        a[1] = pack_bf16x2(s[2 * c][2], s[2 * c][3]);
        a[2] = pack_bf16x2(s[2 * c + 1][0], s[2 * c + 1][1]);
        a[3] = pack_bf16x2(s[2 * c + 1][2], s[2 * c + 1][3]);
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          uint32_t r[4];
          ldmatrix_x4_trans(r, v_frag_row + c * 16 * kMmaPitch + dp * 32);
          mma_bf16(o_acc[2 * dp], a, r[0], r[1]);
          mma_bf16(o_acc[2 * dp + 1], a, r[2], r[3]);
        }
      }
    }
  }

  // ---- epilogue: O = acc * v_scale / l, valid rows only ----
  if (!warp_active) return;
  float out_scales[2];
  softmax.finish(v_scale, out_scales);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = warp_row0 + g + 8 * r;
    if (row >= rows_here) continue;
    const float out_scale = out_scales[r];
    uint16_t* const out =
        p.o + (static_cast<int64_t>(q_begin + q0 + row) * p.num_q_heads + head) * D;
    if constexpr (Traits::kFp8Mma) {
      // Lane t owns d = 16 dp + 4t .. +3: even d from tile 2dp, odd d from tile 2dp+1.
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint2 v;
        v.x = pack_bf16x2(o_acc[2 * dp][2 * r] * out_scale, o_acc[2 * dp + 1][2 * r] * out_scale);
        v.y = pack_bf16x2(o_acc[2 * dp][2 * r + 1] * out_scale,
                          o_acc[2 * dp + 1][2 * r + 1] * out_scale);
        *reinterpret_cast<uint2*>(out + dp * 16 + 4 * t) = v;
      }
    } else {
#pragma unroll
      for (int i = 0; i < Shape::kOTiles; ++i) {
        *reinterpret_cast<uint32_t*>(out + i * 8 + 2 * t) =
            pack_bf16x2(o_acc[i][2 * r] * out_scale, o_acc[i][2 * r + 1] * out_scale);
      }
    }
  }
}

// Builds the device params and launches one instance on `stream`.
template <KvScheme S, int D, int kWarps, int kBlockN>
void launch_prefill(const AttentionParams& a, cudaStream_t stream, DeviceError* error) {
  using Shape = TileShape<S, D, kWarps, kBlockN>;
  const PrefillParams p = make_prefill_params(a, error);
  const dim3 grid = prefill_grid(a, a.num_q_heads, Shape::kBlockM);
  auto kernel = prefill_kernel<S, D, kWarps, kBlockN>;
  FP8KV_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Shape::kSmemBytes));
  kernel<<<grid, Shape::kThreads, Shape::kSmemBytes, stream>>>(p);
  FP8KV_CUDA_CHECK_LAUNCH("prefill_attention");
}

}  // namespace fp8kv::cuda::prefill
