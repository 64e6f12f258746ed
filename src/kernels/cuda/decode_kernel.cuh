// The decode attention kernel. Included only by the instantiation files
// decode_{bf16,fp8_tensor,fp8_head}.cu.
//
// One CTA per (split of the KV length, KV head g and a chunk of its query heads, request b):
// every query head of the chunk shares each K/V row the CTA loads. Each of the 4 warps walks its
// own tiles of the split (tile i of warp w covers tokens [w + 4i] * kTileTokens ...), streaming
// them into shared memory with cp.async, kStages deep, gathered through the slot table (each row
// is one contiguous D-element run; a warp copies whole rows with 16-byte copies). The warp keeps
// its own online softmax (fp32, log2 domain); at the end the 4 warps are merged in shared memory
// and the CTA writes the bf16 output (one split) or a normalized partial and its log-sum-exp (the
// merge kernel in decode.cu combines the splits).
//
// Compute layout: a row of D elements is read by kTpr = D / 8 lanes, 8 elements each, widened to
// fp32 in registers (e4m3x2 -> f16x2 hardware convert); a warp covers 32 / kTpr rows per step.
// Scales: Q's (fp8-per-head) and K's are folded into the softmax multiplier; V's is applied once
// to the final output.
#pragma once

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/decode.cuh"

namespace fp8kv::cuda {

template <KvScheme kScheme, int kHeadDim>
struct DecodeTraits {
  static constexpr int kElemBytes = kScheme == KvScheme::kBf16 ? 2 : 1;
  static constexpr int kVec = 8;                       // elements per lane per row
  static constexpr int kTpr = kHeadDim / kVec;         // lanes per row: 8, 16, 32
  static constexpr int kRowsPerStep = 32 / kTpr;       // rows per warp step
  static constexpr int kRowBytes = kHeadDim * kElemBytes;
  static constexpr int kTileTokens = 2048 / kRowBytes;  // 2 KB of K + 2 KB of V per stage
  static constexpr int kSteps = kTileTokens / kRowsPerStep;
  static constexpr int kChunksPerRow = kRowBytes / 16;
  static constexpr int kCopiesPerLane = kTileTokens * kChunksPerRow / 32;  // K (and V again)
  // 3 stages (2 tiles, 8 KB, in flight per warp while one is computed) keep the shared memory at
  // 48 KB per CTA, so up to 4 CTAs (16 warps) fit an SM (decode_min_blocks in decode.cuh).
  static constexpr int kStages = 3;
  static constexpr int kStageBytes = 2 * kTileTokens * kRowBytes;
  static constexpr int kSmemBytes = kDecodeWarps * kStages * kStageBytes;
  static_assert(kTileTokens <= 32, "one slot per lane");
  static_assert(kSteps >= 1 && kCopiesPerLane >= 1, "tile shape");
};

// 8 elements of a cache row (or of Q) -> fp32.
template <bool kFp8>
__device__ __forceinline__ void load8(const void* p, float (&f)[8]) {
  if constexpr (kFp8) {
    widen_e4m3x8(*reinterpret_cast<const uint2*>(p), f);
  } else {
    widen_bf16x8(*reinterpret_cast<const uint4*>(p), f);
  }
}

// kMinBlocks: CTAs per SM the register allocation must allow (decode.cuh).
template <KvScheme kScheme, int kHeadDim, int kHeads, int kMinBlocks>
__global__ void __launch_bounds__(kDecodeThreads, kMinBlocks) decode_kernel(const DecodeArgs a) {
  using T = DecodeTraits<kScheme, kHeadDim>;
  constexpr bool kFp8 = kScheme != KvScheme::kBf16;
  constexpr bool kQFp8 = kScheme == KvScheme::kFp8PerHead;
  // Rows per softmax update: bounds the score registers (kSub * kHeads <= 16).
  constexpr int kSub = (16 / kHeads) < T::kSteps ? (16 / kHeads) : T::kSteps;
  static_assert(T::kSteps % kSub == 0, "sub-tiles");
  extern __shared__ __align__(16) uint8_t smem[];

  const int split = blockIdx.x;
  const int g = blockIdx.y / a.head_chunks;
  const int hc = blockIdx.y % a.head_chunks;
  const int b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int chunk = lane % T::kTpr;     // this lane's 8 elements of a row
  const int row_lane = lane / T::kTpr;  // this lane's row within a step
  const int seq_len = a.seq_len[b];
  const int t_begin = split * a.split_tokens;
  const int t_end = min(seq_len, t_begin + a.split_tokens);
  const int64_t q_token = a.cu_seqlens_q[b];
  const int head0 = g * a.group + hc * kHeads;  // first query head of this CTA
  const int num_heads = min(kHeads, a.group - hc * kHeads);

  // Q in registers; heads past the group's end are zero and never written.
  float q[kHeads][8];
#pragma unroll
  for (int h = 0; h < kHeads; ++h) {
    if (h < num_heads) {
      const int64_t off = (q_token * a.num_q_heads + head0 + h) * kHeadDim + chunk * 8;
      if constexpr (kQFp8) {
        load8<true>(static_cast<const uint8_t*>(a.q) + off, q[h]);
      } else {
        load8<false>(static_cast<const uint16_t*>(a.q) + off, q[h]);
      }
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) q[h][e] = 0.0f;
    }
  }
  float mult = a.sm_scale_log2;
  float v_scale = 1.0f;
  if constexpr (kFp8) {
    const int s = kScheme == KvScheme::kFp8PerHead ? g : 0;
    mult *= a.k_scale[s];
    v_scale = a.v_scale[s];
  }
  if constexpr (kQFp8) mult *= a.q_scale[static_cast<int64_t>(b) * a.num_kv_heads + g];

  float m[kHeads], l[kHeads], o[kHeads][8];
#pragma unroll
  for (int h = 0; h < kHeads; ++h) {
    m[h] = -INFINITY;
    l[h] = 0.0f;
#pragma unroll
    for (int e = 0; e < 8; ++e) o[h][e] = 0.0f;
  }

  const int num_tiles = t_begin < t_end ? ceil_div(t_end - t_begin, T::kTileTokens) : 0;
  const int my_tiles = warp < num_tiles ? ceil_div(num_tiles - warp, kDecodeWarps) : 0;
  uint8_t* wsmem = smem + warp * T::kStages * T::kStageBytes;
  const int32_t* slot_row = a.req_to_token + static_cast<int64_t>(a.req_index[b]) * a.max_len;
  const int64_t slot_bytes = static_cast<int64_t>(2 * a.num_kv_heads) * T::kRowBytes;
  const uint8_t* k_base = a.cache + static_cast<int64_t>(g) * T::kRowBytes;
  const uint8_t* v_base = a.cache + static_cast<int64_t>(a.num_kv_heads + g) * T::kRowBytes;
  auto tile_token = [&](int i) { return t_begin + (warp + i * kDecodeWarps) * T::kTileTokens; };
  // Lane t < kTileTokens: slot of token t of the warp's tile i, -1 past the end.
  auto load_slot = [&](int i) {
    const int tok = tile_token(i) + lane;
    return (i < my_tiles && lane < T::kTileTokens && tok < t_end) ? slot_row[tok] : -1;
  };
  auto issue = [&](int i, int slot_reg) {
    uint8_t* ks = wsmem + (i % T::kStages) * T::kStageBytes;
    uint8_t* vs = ks + T::kTileTokens * T::kRowBytes;
#pragma unroll
    for (int j = 0; j < T::kCopiesPerLane; ++j) {
      const int c = lane + 32 * j;
      const int row = c / T::kChunksPerRow, col = (c % T::kChunksPerRow) * 16;
      const int slot = __shfl_sync(kFullMask, slot_reg, row);
      // Rows past the end are zero-filled (src size 0): their scores are masked and their V
      // rows must be finite zeros, never stale data (0 * NaN would poison the output).
      const int64_t off = slot >= 0 ? slot * slot_bytes + col : 0;
      const int bytes = slot >= 0 ? 16 : 0;
      cp_async_16(ks + row * T::kRowBytes + col, k_base + off, bytes);
      cp_async_16(vs + row * T::kRowBytes + col, v_base + off, bytes);
    }
  };

  // Software pipeline: tiles i+1..i+kStages-1 are in flight while tile i is computed; the slots
  // of the next tile to issue are loaded one iteration ahead.
  int next_slot = load_slot(0);
#pragma unroll
  for (int i = 0; i < T::kStages - 1; ++i) {
    if (i < my_tiles) {
      const int s = next_slot;
      next_slot = load_slot(i + 1);
      issue(i, s);
    }
    cp_async_commit();
  }
  for (int i = 0; i < my_tiles; ++i) {
    const int j = i + T::kStages - 1;
    if (j < my_tiles) {
      const int s = next_slot;
      next_slot = load_slot(j + 1);
      issue(j, s);
    }
    cp_async_commit();
    cp_async_wait<T::kStages - 1>();
    __syncwarp();  // every lane's copies of tile i are visible to the warp

    const uint8_t* ks = wsmem + (i % T::kStages) * T::kStageBytes;
    const uint8_t* vs = ks + T::kTileTokens * T::kRowBytes;
    const int tok0 = tile_token(i);
#pragma unroll
    for (int sub = 0; sub < T::kSteps / kSub; ++sub) {
      float s[kSub][kHeads];
#pragma unroll
      for (int st = 0; st < kSub; ++st) {
        const int row = (sub * kSub + st) * T::kRowsPerStep + row_lane;
        float kf[8];
        load8<kFp8>(ks + row * T::kRowBytes + chunk * 8 * T::kElemBytes, kf);
#pragma unroll
        for (int h = 0; h < kHeads; ++h) {
          float acc = 0.0f;
#pragma unroll
          for (int e = 0; e < 8; ++e) acc = fmaf(q[h][e], kf[e], acc);
          s[st][h] = acc;
        }
      }
      // Dot products: sum over the kTpr lanes of a row; then mask and scale (log2 domain).
#pragma unroll
      for (int st = 0; st < kSub; ++st) {
        const int row = (sub * kSub + st) * T::kRowsPerStep + row_lane;
        const bool valid = tok0 + row < t_end;
#pragma unroll
        for (int h = 0; h < kHeads; ++h) {
          const float dot = warp_sum<T::kTpr>(s[st][h]);
          s[st][h] = valid ? dot * mult : -INFINITY;
        }
      }
#pragma unroll
      for (int h = 0; h < kHeads; ++h) {
        float mx = s[0][h];
#pragma unroll
        for (int st = 1; st < kSub; ++st) mx = fmaxf(mx, s[st][h]);
#pragma unroll
        for (int off = T::kTpr; off < 32; off <<= 1) mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, off));
        const float m_new = fmaxf(m[h], mx);
        // All scores so far masked: keep the state at zero rather than exp2(-inf - -inf).
        const float alpha = m_new == -INFINITY ? 1.0f : exp2f(m[h] - m_new);
        m[h] = m_new;
        l[h] *= alpha;
#pragma unroll
        for (int e = 0; e < 8; ++e) o[h][e] *= alpha;
#pragma unroll
        for (int st = 0; st < kSub; ++st) {
          const float p = m_new == -INFINITY ? 0.0f : exp2f(s[st][h] - m_new);
          s[st][h] = p;
          l[h] += p;
        }
      }
#pragma unroll
      for (int st = 0; st < kSub; ++st) {
        const int row = (sub * kSub + st) * T::kRowsPerStep + row_lane;
        float vf[8];
        load8<kFp8>(vs + row * T::kRowBytes + chunk * 8 * T::kElemBytes, vf);
#pragma unroll
        for (int h = 0; h < kHeads; ++h) {
#pragma unroll
          for (int e = 0; e < 8; ++e) o[h][e] = fmaf(s[st][h], vf[e], o[h][e]);
        }
      }
    }
    __syncwarp();  // tile i's stage is refilled by the next iteration's issue
  }
  cp_async_wait<0>();

  // Each lane holds the sums of its row lane only: add over the rows of a step.
#pragma unroll
  for (int h = 0; h < kHeads; ++h) {
#pragma unroll
    for (int off = T::kTpr; off < 32; off <<= 1) {
      l[h] += __shfl_xor_sync(kFullMask, l[h], off);
#pragma unroll
      for (int e = 0; e < 8; ++e) o[h][e] += __shfl_xor_sync(kFullMask, o[h][e], off);
    }
  }

  // Merge the 4 warps in shared memory (the pipeline buffers are free now).
  __syncthreads();
  float* s_o = reinterpret_cast<float*>(smem);                  // [warps, kHeads, D]
  float* s_m = s_o + kDecodeWarps * kHeads * kHeadDim;          // [warps, kHeads]
  float* s_l = s_m + kDecodeWarps * kHeads;                     // [warps, kHeads]
  if (row_lane == 0) {
#pragma unroll
    for (int h = 0; h < kHeads; ++h) {
#pragma unroll
      for (int e = 0; e < 8; ++e) s_o[(warp * kHeads + h) * kHeadDim + chunk * 8 + e] = o[h][e];
      if (lane == 0) {
        s_m[warp * kHeads + h] = m[h];
        s_l[warp * kHeads + h] = l[h];
      }
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < num_heads * kHeadDim; i += kDecodeThreads) {
    const int h = i / kHeadDim, d = i % kHeadDim;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) mx = fmaxf(mx, s_m[w * kHeads + h]);
    float sum_l = 0.0f, sum_o = 0.0f;
    if (mx != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kDecodeWarps; ++w) {
        const float f = exp2f(s_m[w * kHeads + h] - mx);
        sum_l += f * s_l[w * kHeads + h];
        sum_o += f * s_o[(w * kHeads + h) * kHeadDim + d];
      }
    }
    const float out = sum_l > 0.0f ? sum_o / sum_l * v_scale : 0.0f;
    const int head = head0 + h;
    if (a.num_splits == 1) {
      a.o[(q_token * a.num_q_heads + head) * kHeadDim + d] = float_to_bf16_bits(out);
    } else {
      const int64_t row = (static_cast<int64_t>(b) * a.num_q_heads + head) * a.num_splits + split;
      a.ws_o[row * kHeadDim + d] = out;
      if (d == 0) a.ws_lse[row] = sum_l > 0.0f ? mx + __log2f(sum_l) : -INFINITY;
    }
  }
}

template <KvScheme kScheme, int kHeadDim, int kHeads, int kMinBlocks>
int DecodeKernel<kScheme, kHeadDim, kHeads, kMinBlocks>::ctas_per_sm() {
  using T = DecodeTraits<kScheme, kHeadDim>;
  static const int n = [] {
    auto* k = decode_kernel<kScheme, kHeadDim, kHeads, kMinBlocks>;
    FP8KV_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, T::kSmemBytes));
    int v = 0;
    FP8KV_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&v, k, kDecodeThreads, T::kSmemBytes));
    return v < 1 ? 1 : v;
  }();
  return n;
}

template <KvScheme kScheme, int kHeadDim, int kHeads, int kMinBlocks>
void DecodeKernel<kScheme, kHeadDim, kHeads, kMinBlocks>::launch(const DecodeArgs& a, dim3 grid,
                                                                 cudaStream_t stream) {
  using T = DecodeTraits<kScheme, kHeadDim>;
  ctas_per_sm();  // sets the shared-memory limit once
  decode_kernel<kScheme, kHeadDim, kHeads, kMinBlocks><<<grid, kDecodeThreads, T::kSmemBytes, stream>>>(a);
  FP8KV_CUDA_CHECK_LAUNCH("decode_kernel");
}

#define FP8KV_DECODE_INSTANTIATE(SCHEME)                 \
  template struct DecodeKernel<SCHEME, 64, 1>;           \
  template struct DecodeKernel<SCHEME, 64, 2>;           \
  template struct DecodeKernel<SCHEME, 64, 4>;           \
  template struct DecodeKernel<SCHEME, 64, 8>;           \
  template struct DecodeKernel<SCHEME, 128, 1>;          \
  template struct DecodeKernel<SCHEME, 128, 2>;          \
  template struct DecodeKernel<SCHEME, 128, 4>;          \
  template struct DecodeKernel<SCHEME, 128, 8>;          \
  template struct DecodeKernel<SCHEME, 256, 1>;          \
  template struct DecodeKernel<SCHEME, 256, 2>;          \
  template struct DecodeKernel<SCHEME, 256, 4>;          \
  template struct DecodeKernel<SCHEME, 256, 8>;           \
  template struct DecodeKernel<SCHEME, 64, 4, decode_alt_min_blocks<SCHEME>()>;        \
  template struct DecodeKernel<SCHEME, 128, 4, decode_alt_min_blocks<SCHEME>()>;       \
  template struct DecodeKernel<SCHEME, 256, 4, decode_alt_min_blocks<SCHEME>()>;

}  // namespace fp8kv::cuda
