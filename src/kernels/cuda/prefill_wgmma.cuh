// fp8-per-head prefill attention on Hopper's warpgroup tensor cores (wgmma, sm_90a): the fast
// path. Same semantics, grid and pipeline as prefill_kernel.cuh (read that first); what differs:
//
//  - On sm_90 an e4m3 mma.sync is executed as fp16 HMMAs after unpacking both operands, so the
//    mma.sync kernel gets no FP8 rate. Here QK^T is wgmma m64n{kBlockN}k32 e4m3 with Q and K from
//    shared memory, and PV is wgmma m64n{D}k32 e4m3 with P from registers and V^T from shared
//    memory. Each warpgroup (4 warps) owns 64 query rows; a CTA has kWarpgroups of them (1 or
//    2) and kMinBlocks CTAs share an SM (prefill_instances.cuh lists the built shapes).
//  - wgmma reads 8-bit operands only K-major, from the canonical no-swizzle layout: 8 x 16-byte
//    core matrices stored as 128 contiguous bytes; core matrices adjacent in K are kCoreBytes
//    apart (the descriptor's leading byte offset), those adjacent in M/N are (K bytes / 16) * 128
//    apart (its stride byte offset). Q and K tiles are written in that layout by cp.async.
//  - V arrives as plain rows [keys][D] and is transposed once per tile into V^T [D][keys] (K-major
//    for PV) by all threads: ldmatrix.trans plus byte permutes, as the mma.sync kernel builds its
//    V fragments. The keys of each 32-key chunk are stored in the order {2t, 2t+1, 2t+8, 2t+9}
//    (t = 0..3), then 16 + those: the order in which the S accumulators hold them, so P's A
//    fragment is a plain repacking of S (no shuffles).
//  - Shared memory written by the generic proxy (cp.async, st.shared) is read by wgmma through the
//    async proxy: every thread fences (fence.proxy.async) before the barrier that publishes it.
//
// Measured on H100 80GB HBM3, causal B=2 L=8192 Hq=32 Hkv=8 D=128 (4*B*Hq*L^2*D/2 flops):
//   mma.sync e4m3 (prefill_kernel.cuh, kWide)       4.65 ms  237 TFLOP/s (bf16 kWide: 276)
//   this kernel, 2 warpgroups, 128 keys/tile          2.90 ms  379 TFLOP/s (kWgmma, the default)
//   this kernel, 2 warpgroups, 64 keys/tile           3.11 ms  354 TFLOP/s (kWgmmaShort)
//   1 warpgroup/CTA, 2-3 CTAs/SM                      319-340 TFLOP/s (not built)
// What is left on the table: the two warpgroups of a CTA run in lockstep between the barriers,
// so the tensor cores idle during the softmax; FA3's answer is producer/consumer warp
// specialization with TMA loads and ping-pong scheduling of the consumer warpgroups.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "fp8kv/backend.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/prefill_kernel.cuh"
#include "kernels/cuda/prefill_wgmma_ops.cuh"

namespace fp8kv::cuda::prefill {

constexpr int kCoreBytes = 128;  // one 8 x 16-byte core matrix

template <int D, int kBlockN, int kWarpgroups>
struct WgmmaShape {
  static constexpr int kThreads = kWarpgroups * 128;
  static constexpr int kBlockM = kWarpgroups * 64;
  static constexpr int kKBlockStride = D / 16 * kCoreBytes;  // 8 rows of a [rows][D] tile: SBO
  static constexpr int kQBytes = kBlockM * D;                // canonical [kBlockM][D]
  static constexpr int kKBytes = kBlockN * D;                // canonical [kBlockN][D]
  static constexpr int kVPitch = D + 16;                     // plain rows, padded for ldmatrix
  static constexpr int kVBytes = kBlockN * kVPitch;
  static constexpr int kStageBytes = kKBytes + kVBytes;
  static constexpr int kVtBlockStride = kBlockN / 16 * kCoreBytes;  // 8 d rows of V^T: SBO
  static constexpr int kVtBytes = D * kBlockN;               // canonical [D][kBlockN]
  static constexpr int kSmemBytes = kQBytes + 2 * kStageBytes + kVtBytes;
  static constexpr int kChunksPerRow = D / 16;
  static constexpr int kRowStep = kThreads / kChunksPerRow;  // rows between a thread's chunks
  static constexpr int kKvRowsPerThread = kBlockN / kRowStep;
  static constexpr int kQRowsPerThread = kBlockM / kRowStep;
  static_assert(kThreads % (8 * kChunksPerRow) == 0, "a load step covers whole 8-row blocks");
  static_assert(kBlockN % kRowStep == 0 && kBlockM % kRowStep == 0, "rows split over threads");
  static_assert(kBlockN == 64 || kBlockN == 128, "QK^T wgmma N");
  static_assert(D == 64 || D == 128 || D == 256, "PV wgmma N");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory of one CTA exceeds Hopper's limit");
};

// Shared-memory matrix descriptor, no swizzle (PTX ISA "Matrix Descriptor Format").
__device__ __forceinline__ uint64_t wgmma_desc(uint32_t smem_address, uint32_t leading_bytes,
                                               uint32_t stride_bytes) {
  return static_cast<uint64_t>((smem_address & 0x3ffff) >> 4) |
         (static_cast<uint64_t>((leading_bytes & 0x3ffff) >> 4) << 16) |
         (static_cast<uint64_t>((stride_bytes & 0x3ffff) >> 4) << 32);
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_wait_all() {
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
}
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// Pins accumulator registers at this point of the program: the compiler does not know that
// wgmma writes them asynchronously.
template <int N>
__device__ __forceinline__ void fence_operands(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

template <int N>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b) {
  if constexpr (N == 64) wgmma_ss_m64n64k32_e4m3(d, desc_a, desc_b);
  else wgmma_ss_m64n128k32_e4m3(d, desc_a, desc_b);
}
template <int N>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b) {
  if constexpr (N == 64) wgmma_rs_m64n64k32_e4m3(d, a, desc_b);
  else if constexpr (N == 128) wgmma_rs_m64n128k32_e4m3(d, a, desc_b);
  else wgmma_rs_m64n256k32_e4m3(d, a, desc_b);
}

// kMinBlocks CTAs per SM: with more than one, independent CTAs overlap one's softmax with
// another's wgmmas (the warpgroups of one CTA run in lockstep between its barriers).
template <int D, int kBlockN, int kWarpgroups, int kMinBlocks>
__global__ void __launch_bounds__(kWarpgroups * 128, kMinBlocks)
    prefill_wgmma_kernel(const PrefillParams p) {
  using Shape = WgmmaShape<D, kBlockN, kWarpgroups>;
  constexpr int kThreads = Shape::kThreads;
  constexpr int kBlockM = Shape::kBlockM;
  constexpr int kChunks = Shape::kChunksPerRow;
  constexpr int kRowStep = Shape::kRowStep;

  extern __shared__ __align__(128) uint8_t smem[];  // no-swizzle operands need 16-byte alignment
  uint8_t* const q_smem = smem;                          // canonical [kBlockM][D]
  uint8_t* const stage_smem = smem + Shape::kQBytes;     // [2]{K canonical, V rows}
  uint8_t* const vt_smem = stage_smem + 2 * Shape::kStageBytes;  // canonical [D][kBlockN]
  const uint32_t smem_base = smem_addr(smem);

  const int head = blockIdx.x;
  const int b = blockIdx.y;
  const int q_tile = gridDim.z - 1 - blockIdx.z;
  const int q_begin = p.cu_seqlens_q[b];
  const int q_len = p.cu_seqlens_q[b + 1] - q_begin;
  const int q0 = q_tile * kBlockM;
  if (q0 >= q_len) return;
  const int seq_len = p.seq_len[b];
  const int prefix = seq_len - q_len;
  const int kv_head = head / (p.num_q_heads / p.num_kv_heads);
  const int32_t* const slots = request_row<DeviceErrorKind::kPrefillRequest>(p, b);
  if (slots == nullptr) return;  // the same for every thread of the CTA: before any barrier

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int wg = warp / 4;
  const int g = lane / 4;
  const int t = lane % 4;
  const int rows_here = min(kBlockM, q_len - q0);
  const int last_pos = prefix + q0 + rows_here - 1;
  const int num_kv_tiles = last_pos / kBlockN + 1;
  const int wg_row0 = wg * 64;
  const bool wg_active = wg_row0 < rows_here;
  const int wg_first_pos = prefix + q0 + wg_row0;
  const int wg_last_pos = prefix + q0 + min(wg_row0 + 64, rows_here) - 1;
  const int row_g = wg_row0 + (warp % 4) * 16 + g;  // this thread's rows: row_g and row_g + 8
  const int pos_g = prefix + q0 + row_g;

  const int si = kv_head;
  const float qk_scale =
      p.softmax_scale * kLog2e * p.k_scale[si] * p.q_scale[b * p.num_kv_heads + kv_head];
  const float v_scale = p.v_scale[si];

  // Load mapping: 8 consecutive threads take rows r..r+7 of one 16-byte column chunk, so each
  // 8-thread phase writes one whole core matrix (128 contiguous bytes).
  const int ld_chunk = (tid / 8) % kChunks;
  const int ld_row = (tid / (8 * kChunks)) * 8 + tid % 8;
  auto canonical = [&](int row, int chunk) {
    return (row / 8) * Shape::kKBlockStride + chunk * kCoreBytes + (row % 8) * 16;
  };

  // ---- Q (e4m3) into the canonical layout; rows past q_len zero-filled ----
  {
    const int64_t token_bytes = static_cast<int64_t>(p.num_q_heads) * D;
    const uint8_t* q_base = static_cast<const uint8_t*>(p.q) +
                            (static_cast<int64_t>(q_begin + q0) * p.num_q_heads + head) * D;
#pragma unroll
    for (int i = 0; i < Shape::kQRowsPerThread; ++i) {
      const int r = ld_row + i * kRowStep;
      const bool valid = r < rows_here;
      cp_async_16(q_smem + canonical(r, ld_chunk),
                  valid ? q_base + r * token_bytes + ld_chunk * 16 : p.q, valid ? 16 : 0);
    }
  }

  // ---- K/V through the slot indirection ----
  constexpr int kLoadRows = Shape::kKvRowsPerThread;
  const int64_t head_bytes = D;
  const int64_t slot_bytes = 2 * p.num_kv_heads * head_bytes;
  const uint8_t* const k_base = p.kv + kv_head * head_bytes + ld_chunk * 16;
  const uint8_t* const v_base = k_base + p.num_kv_heads * head_bytes;
  int tile_slots[kLoadRows];
  auto fetch_slots = [&](int tile) {
#pragma unroll
    for (int i = 0; i < kLoadRows; ++i) {
      const int pos = tile * kBlockN + ld_row + i * kRowStep;
      tile_slots[i] = pos < seq_len ? slots[pos] : -1;
    }
  };
  auto issue_tile = [&](int tile) {
    uint8_t* const k_stage = stage_smem + (tile & 1) * Shape::kStageBytes;
    uint8_t* const v_stage = k_stage + Shape::kKBytes;
#pragma unroll
    for (int i = 0; i < kLoadRows; ++i) {
      const int row = ld_row + i * kRowStep;
      const bool valid = tile_slots[i] >= 0;
      const int64_t offset = valid ? tile_slots[i] * slot_bytes : 0;
      cp_async_16(k_stage + canonical(row, ld_chunk), k_base + offset, valid ? 16 : 0);
      cp_async_16(v_stage + row * Shape::kVPitch + ld_chunk * 16, v_base + offset, valid ? 16 : 0);
    }
  };

  fetch_slots(0);
  issue_tile(0);
  cp_async_commit();
  if (num_kv_tiles > 1) fetch_slots(1);

  float o_acc[D / 2];  // wgmma m64nD accumulators: n8 tile i in o_acc[4i .. 4i+3]
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o_acc[i] = 0.0f;
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.0f, 0.0f};

  const uint32_t q_desc_base = smem_base + wg * 64 * D;  // this warpgroup's 64 rows
  const uint32_t vt_base = smem_base + static_cast<uint32_t>(vt_smem - smem);
  // V^T writes: lane (g, t) gets, from the 4 matrices of keys c*32 + {0-7, 8-15, 16-23, 24-31}
  // at d block dp*16, the words of d = dp*16 + 2g (even) and + 1 (odd) for slots c*32 + 4t
  // (keys 2t, 2t+1, 2t+8, 2t+9) and c*32 + 16 + 4t.
  const int mat = lane / 8;
  const int mat_row = lane % 8;
  constexpr int kTransposeBlocks = (kBlockN / 32) * (D / 16);

  for (int j = 0; j < num_kv_tiles; ++j) {
    cp_async_wait<0>();
    __syncthreads();  // tile j landed; every warp is done with tile j-1 (and with V^T)
    if (j + 1 < num_kv_tiles) issue_tile(j + 1);
    cp_async_commit();
    if (j + 2 < num_kv_tiles) fetch_slots(j + 2);

    const uint32_t k_stage_addr = smem_base + static_cast<uint32_t>(Shape::kQBytes + (j & 1) * Shape::kStageBytes);
    const uint32_t v_rows_addr = k_stage_addr + Shape::kKBytes;
    // ---- V (rows) -> V^T (canonical, permuted keys) ----
#pragma unroll
    for (int blk = warp; blk < kTransposeBlocks; blk += kThreads / 32) {
      const int c = blk / (D / 16);
      const int dp = blk % (D / 16);
      uint32_t r[4];
      ldmatrix_x4_trans(r, v_rows_addr + (c * 32 + mat * 8 + mat_row) * Shape::kVPitch + dp * 16);
      const int d_even = dp * 16 + 2 * g;
      const int d_odd = d_even + 1;
      // slot s = c*32 + h*16 + 4t -> core column block (2c + h), byte 4t within the 16.
      const uint32_t col0 = (2 * c) * kCoreBytes + 4 * t;
      const uint32_t col1 = col0 + kCoreBytes;
      uint8_t* const vt = vt_smem;
      const int e_off = (d_even / 8) * Shape::kVtBlockStride + (d_even % 8) * 16;
      const int o_off = (d_odd / 8) * Shape::kVtBlockStride + (d_odd % 8) * 16;
      *reinterpret_cast<uint32_t*>(vt + e_off + col0) = __byte_perm(r[0], r[1], 0x6420);
      *reinterpret_cast<uint32_t*>(vt + o_off + col0) = __byte_perm(r[0], r[1], 0x7531);
      *reinterpret_cast<uint32_t*>(vt + e_off + col1) = __byte_perm(r[2], r[3], 0x6420);
      *reinterpret_cast<uint32_t*>(vt + o_off + col1) = __byte_perm(r[2], r[3], 0x7531);
    }
    fence_proxy_async();  // this thread's cp.async'd Q/K and st.shared V^T -> async proxy
    __syncthreads();

    const int k0 = j * kBlockN;
    if (!wg_active || k0 > wg_last_pos) continue;  // warpgroup-uniform

    // ---- S = Q K^T: D/32 wgmmas of k = 32 bytes ----
    float s[kBlockN / 2];
#pragma unroll
    for (int i = 0; i < kBlockN / 2; ++i) s[i] = 0.0f;
    fence_operands(s);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 32; ++kk) {
      const uint64_t da = wgmma_desc(q_desc_base + kk * 2 * kCoreBytes, kCoreBytes, Shape::kKBlockStride);
      const uint64_t db = wgmma_desc(k_stage_addr + kk * 2 * kCoreBytes, kCoreBytes, Shape::kKBlockStride);
      wgmma_ss<kBlockN>(s, da, db);
    }
    wgmma_commit();
    wgmma_wait_all();
    fence_operands(s);

    // ---- causal mask where the tile crosses this warpgroup's diagonal ----
    if (k0 + kBlockN - 1 > wg_first_pos) {
#pragma unroll
      for (int i = 0; i < kBlockN / 8; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = k0 + i * 8 + 2 * t + (e & 1);
          if (key > pos_g + (e >> 1) * 8) s[4 * i + e] = -INFINITY;
        }
      }
    }

    // ---- online softmax (as prefill_kernel.cuh) ----
    float new_max[2] = {row_max[0], row_max[1]};
#pragma unroll
    for (int i = 0; i < kBlockN / 8; ++i) {
      new_max[0] = fmaxf(new_max[0], fmaxf(s[4 * i], s[4 * i + 1]));
      new_max[1] = fmaxf(new_max[1], fmaxf(s[4 * i + 2], s[4 * i + 3]));
    }
    float alpha[2], neg_max[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      new_max[r] = fmaxf(new_max[r], __shfl_xor_sync(kFullMask, new_max[r], 1));
      new_max[r] = fmaxf(new_max[r], __shfl_xor_sync(kFullMask, new_max[r], 2));
      alpha[r] = fast_exp2((row_max[r] - new_max[r]) * qk_scale);
      row_max[r] = new_max[r];
      neg_max[r] = -new_max[r] * qk_scale;
    }
    float tile_sum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int i = 0; i < kBlockN / 2; ++i) {
      const int r = (i >> 1) & 1;
      s[i] = fast_exp2(fmaf(s[i], qk_scale, neg_max[r]));
      tile_sum[r] += s[i];
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) row_sum[r] = row_sum[r] * alpha[r] + tile_sum[r];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o_acc[i] *= alpha[(i >> 1) & 1];

    // ---- O += P V: P to e4m3 in the permuted key order, V^T from shared memory ----
    uint32_t pa[kBlockN / 32][4];
#pragma unroll
    for (int c = 0; c < kBlockN / 32; ++c) {
      const float* s0 = &s[16 * c];  // n8 tiles 4c .. 4c+3
      pa[c][0] = pack_e4m3x4(s0[0], s0[1], s0[4], s0[5]);
      pa[c][1] = pack_e4m3x4(s0[2], s0[3], s0[6], s0[7]);
      pa[c][2] = pack_e4m3x4(s0[8], s0[9], s0[12], s0[13]);
      pa[c][3] = pack_e4m3x4(s0[10], s0[11], s0[14], s0[15]);
    }
    fence_operands(o_acc);
    wgmma_fence();
#pragma unroll
    for (int c = 0; c < kBlockN / 32; ++c) {
      const uint64_t db = wgmma_desc(vt_base + c * 2 * kCoreBytes, kCoreBytes, Shape::kVtBlockStride);
      wgmma_rs<D>(o_acc, pa[c], db);
    }
    wgmma_commit();
    wgmma_wait_all();
    fence_operands(o_acc);
  }

  // ---- epilogue ----
  if (!wg_active) return;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_sum[r] += __shfl_xor_sync(kFullMask, row_sum[r], 1);
    row_sum[r] += __shfl_xor_sync(kFullMask, row_sum[r], 2);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row_g + 8 * r;
    if (row >= rows_here) continue;
    const float out_scale = row_sum[r] > 0.0f ? v_scale / row_sum[r] : 0.0f;
    uint16_t* const out = p.o + (static_cast<int64_t>(q_begin + q0 + row) * p.num_q_heads + head) * D;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      *reinterpret_cast<uint32_t*>(out + i * 8 + 2 * t) =
          pack_bf16x2(o_acc[4 * i + 2 * r] * out_scale, o_acc[4 * i + 2 * r + 1] * out_scale);
    }
  }
}

template <int D, int kBlockN, int kWarpgroups, int kMinBlocks>
void launch_prefill_wgmma(const AttentionParams& a, cudaStream_t stream, DeviceError* error) {
  using Shape = WgmmaShape<D, kBlockN, kWarpgroups>;
  PrefillParams p;
  p.q = a.q_fp8;
  p.q_scale = a.q_scale;
  p.o = a.o;
  p.kv = static_cast<const uint8_t*>(a.cache.data);
  p.k_scale = a.scales.k;
  p.v_scale = a.scales.v;
  p.seq_len = a.batch.seq_len;
  p.cu_seqlens_q = a.batch.cu_seqlens_q;
  p.req_index = a.batch.req_index;
  p.req_to_token = a.batch.req_to_token;
  p.error = error;
  p.max_requests = a.batch.max_requests;
  p.max_len = a.batch.max_len;
  p.num_q_heads = a.num_q_heads;
  p.num_kv_heads = a.cache.num_kv_heads;
  p.softmax_scale = a.softmax_scale > 0.0f ? a.softmax_scale : 1.0f / std::sqrt(static_cast<float>(D));
  const int q_tiles = ceil_div(a.batch.max_q_len, Shape::kBlockM);
  if (q_tiles > 65535 || a.batch.num_requests > 65535) {
    throw Error("prefill_attention: grid too large (max_q_len " + std::to_string(a.batch.max_q_len) +
                ", num_requests " + std::to_string(a.batch.num_requests) + ")");
  }
  auto kernel = prefill_wgmma_kernel<D, kBlockN, kWarpgroups, kMinBlocks>;
  FP8KV_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        Shape::kSmemBytes));
  const dim3 grid(a.num_q_heads, a.batch.num_requests, q_tiles);
  kernel<<<grid, Shape::kThreads, Shape::kSmemBytes, stream>>>(p);
  FP8KV_CUDA_CHECK_LAUNCH("prefill_attention");
}

}  // namespace fp8kv::cuda::prefill
