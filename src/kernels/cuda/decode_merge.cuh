// The split-KV merge of decode, one piece for both places that run it: the decode kernel's last
// CTA of each (request, head group) when the split count is small (decode_mma_kernel.cuh), and
// decode.cu's merge kernel otherwise.
#pragma once

#include <cstdint>

#include "kernels/cuda/common.cuh"

namespace fp8kv::cuda {

// o = sum_s w_s o_s / sum_s w_s with w_s = 2^(lse_s - max lse) over the num_splits partials of
// one (request, query head) (rows row0 .. row0 + num_splits - 1 of ws_o / ws_lse), by one warp:
// lane l reads and writes dims kPer * l .. + kPer - 1 (kPer = D / 32), the split loop unrolled so
// that several splits' loads are in flight at once. The partials were written by other CTAs:
// read through L2 (ld.global.cg), after the caller's fence or grid dependency.
template <int kHeadDim>
__device__ __forceinline__ void merge_split_row(const float* ws_o, const float* ws_lse, int64_t row0,
                                                int num_splits, uint16_t* o_row, int lane) {
  constexpr int kPer = kHeadDim / 32;  // 2, 4, 8
  float mx = -INFINITY;
  for (int s = lane; s < num_splits; s += 32) mx = fmaxf(mx, __ldcg(ws_lse + row0 + s));
  mx = warp_max(mx);
  float acc[kPer] = {};
  float sum_w = 0.0f;
  if (mx != -INFINITY) {
#pragma unroll 8
    for (int s = 0; s < num_splits; ++s) {
      const float w = exp2f(__ldcg(ws_lse + row0 + s) - mx);
      const float* src = ws_o + (row0 + s) * kHeadDim + kPer * lane;
      float x[kPer];
#pragma unroll
      for (int i = 0; i < kPer; i += 2) {
        const float2 v = __ldcg(reinterpret_cast<const float2*>(src + i));
        x[i] = v.x;
        x[i + 1] = v.y;
      }
      sum_w += w;
#pragma unroll
      for (int i = 0; i < kPer; ++i) acc[i] += w * x[i];
    }
  }
  uint16_t* dst = o_row + kPer * lane;
#pragma unroll
  for (int i = 0; i < kPer; ++i) dst[i] = float_to_bf16_bits(sum_w > 0.0f ? acc[i] / sum_w : 0.0f);
}

}  // namespace fp8kv::cuda
