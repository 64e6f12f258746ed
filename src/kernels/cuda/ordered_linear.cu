// The fixed-order GEMMs behind ModelOps::linear_ordered (fp8kv/model_ops.h): a CUDA-core kernel
// for any weights and a tensor-core kernel for bf16 weights in runs of 32k. Their CPU twin is
// kernels/cpu/model_ops.cpp; the shape rules are kernels/ordered_linear.h.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "fp8kv/error.h"
#include "fp8kv/fp8.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/ordered_linear.h"
#include "kernels/ordered_linear.h"

namespace fp8kv::cuda {
namespace {

// linear_ordered (fp8kv/model_ops.h): a 64 x 64 tile of y per block, 4 x 4 outputs per thread (rows
// ty + 16 i, columns tx + 16 j), k through shared memory 16 at a time. Each output sums its run
// from first to last element with fmaf (products of bf16 values are exact, so this rounds as
// the CPU twin's multiply-then-add) and closes one tree level per trailing one bit of the run's
// index; the partial sums of open levels stay in registers. No element is padded into a sum.
constexpr int kOrdTile = 64, kOrdK = 16, kOrdThreads = 256;

__device__ __forceinline__ float ordered_weight(float w) { return w; }
__device__ __forceinline__ float ordered_weight(uint16_t w) { return fp8kv::bf16_to_float(w); }

template <typename W>
__global__ void __launch_bounds__(kOrdThreads)
    linear_ordered_kernel(const float* __restrict__ x, const W* __restrict__ w,
                          const float* __restrict__ bias, float* __restrict__ y, int m, int n,
                          int k, int run, int chunks, int top) {
  constexpr bool kRoundX = sizeof(W) == 2;  // bf16 weights: x rounded to bf16, as in linear
  __shared__ float xs[kOrdK][kOrdTile + 1];
  __shared__ float ws[kOrdK][kOrdTile + 1];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int row0 = blockIdx.y * kOrdTile, col0 = blockIdx.x * kOrdTile;
  float stack[kMaxOrderedLevels + 1][4][4];
  for (int c = 0; c < chunks; ++c) {
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
    }
    const int end = (c + 1) * run;
    for (int k0 = c * run; k0 < end; k0 += kOrdK) {
      const int kn = min(kOrdK, end - k0);
      for (int e = threadIdx.x; e < kOrdTile * kOrdK; e += kOrdThreads) {
        const int r = e / kOrdK, kk = e % kOrdK;
        float xv = 0.0f, wv = 0.0f;
        if (kk < kn) {
          if (row0 + r < m) {
            xv = x[static_cast<int64_t>(row0 + r) * k + k0 + kk];
            if (kRoundX) xv = fp8kv::bf16_to_float(fp8kv::float_to_bf16(xv));
          }
          if (col0 + r < n) wv = ordered_weight(w[static_cast<int64_t>(col0 + r) * k + k0 + kk]);
        }
        xs[kk][r] = xv;
        ws[kk][r] = wv;
      }
      __syncthreads();
      for (int kk = 0; kk < kn; ++kk) {
        float a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          a[i] = xs[kk][ty + 16 * i];
          b[i] = ws[kk][tx + 16 * i];
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int level = 0; level <= kMaxOrderedLevels; ++level) {
      if (level < kMaxOrderedLevels && ((c >> level) & 1)) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = stack[level][i][j] + acc[i][j];
        }
      } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
          for (int j = 0; j < 4; ++j) stack[level][i][j] = acc[i][j];
        }
        break;
      }
    }
  }
#pragma unroll
  for (int level = 0; level <= kMaxOrderedLevels; ++level) {
    if (level != top) continue;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = row0 + ty + 16 * i;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int col = col0 + tx + 16 * j;
        if (r < m && col < n) {
          const float v = stack[level][i][j];
          y[static_cast<int64_t>(r) * n + col] = bias ? v + bias[col] : v;
        }
      }
    }
  }
}

// linear_ordered on tensor cores (bf16 weights, runs a multiple of kTcK): x already rounded to
// bf16 (x16), a 128 x 64 tile of y per block, 8 warps of 32 x 32 (2 x 4 m16n8k16 MMAs), k through
// a 3-stage cp.async pipeline 32 at a time. Each output accumulates its run in MMA steps of 16
// products, steps first to last, from zero; the tensor core adds a step's products in its own
// fixed way, so an element's bits depend only on its row of x, its row of w and the run
// boundaries -- not on its position, the grid, or the rest of the call -- and the runs then add
// as the tree of linear_ordered_kernel (partials of open levels in registers).
constexpr int kTcM = 128, kTcN = 64, kTcK = 32, kTcPitch = kTcK + 8, kTcStages = 3;

__global__ void __launch_bounds__(kOrdThreads)
    linear_ordered_tc_kernel(const uint16_t* __restrict__ x16, const uint16_t* __restrict__ w,
                             const float* __restrict__ bias, float* __restrict__ y, int m, int n,
                             int k, int run, int chunks) {
  // Rows padded to 80 bytes: the 8 row addresses of an ldmatrix fall in distinct banks.
  __shared__ alignas(16) uint16_t xs[kTcStages][kTcM][kTcPitch];
  __shared__ alignas(16) uint16_t ws[kTcStages][kTcN][kTcPitch];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;  // the warp's 32 x 32 within the tile
  const int row0 = blockIdx.y * kTcM, col0 = blockIdx.x * kTcN;
  const int steps = k / kTcK, steps_per_run = run / kTcK;

  auto load = [&](int stage, int step) {
    const int kb = step * kTcK;
    for (int e = threadIdx.x; e < (kTcM + kTcN) * (kTcK / 8); e += kOrdThreads) {
      const int r = e / (kTcK / 8), c = (e % (kTcK / 8)) * 8;
      if (r < kTcM) {
        const int g = row0 + r;  // rows past m are zero-filled (and never stored)
        cp_async_16(&xs[stage][r][c], x16 + static_cast<int64_t>(g < m ? g : 0) * k + kb + c,
                    g < m ? 16 : 0);
      } else {
        const int g = col0 + r - kTcM;
        cp_async_16(&ws[stage][r - kTcM][c], w + static_cast<int64_t>(g < n ? g : 0) * k + kb + c,
                    g < n ? 16 : 0);
      }
    }
  };

  float acc[2][4][4];
  float stack[kMaxOrderedLevels][2][4][4];
  auto zero = [&] {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;
  };
  zero();
#pragma unroll
  for (int s = 0; s < kTcStages - 1; ++s) {
    if (s < steps) load(s, s);
    cp_async_commit();
  }
  for (int step = 0; step < steps; ++step) {
    cp_async_wait<kTcStages - 2>();
    __syncthreads();  // stage step % kTcStages has landed; the stage loaded next is free
    const int ahead = step + kTcStages - 1;
    if (ahead < steps) load(ahead % kTcStages, ahead);
    cp_async_commit();
    const int st = step % kTcStages;
#pragma unroll
    for (int kk = 0; kk < kTcK; kk += 16) {
      uint32_t a[2][4], b[2][4];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        ldmatrix_x4(a[i], smem_addr(&xs[st][wm + i * 16 + (lane & 15)][kk + (lane >> 4) * 8]));
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        ldmatrix_x4(b[j], smem_addr(&ws[st][wn + j * 16 + (lane & 7) + ((lane >> 4) << 3)]
                                       [kk + ((lane >> 3) & 1) * 8]));
      }
#pragma unroll
      for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          mma_bf16(acc[i][j], a[i], b[j / 2][(j % 2) * 2], b[j / 2][(j % 2) * 2 + 1]);
        }
      }
    }
    if ((step + 1) % steps_per_run != 0) continue;
    // Run c ends: close one tree level per trailing one bit of c; the last run keeps the total.
    const int c = step / steps_per_run;
    bool stored = false;
#pragma unroll
    for (int level = 0; level < kMaxOrderedLevels; ++level) {
      if (stored) break;
      if (((c >> level) & 1) == 0) {
        if (c != chunks - 1) {
#pragma unroll
          for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j)
#pragma unroll
              for (int e = 0; e < 4; ++e) stack[level][i][j][e] = acc[i][j][e];
          zero();
        }
        stored = true;
      } else {
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = stack[level][i][j][e] + acc[i][j][e];
      }
    }
    // Not stored after every level: c = 2^kMaxOrderedLevels - 1, the last run; acc is the total.
  }
  cp_async_wait<0>();
  // acc holds the total: rows lane / 4 (+ 8), columns 2 (lane % 4) (+ 1) of each m16n8 tile.
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = row0 + wm + i * 16 + lane / 4 + (e >= 2 ? 8 : 0);
        const int col = col0 + wn + j * 8 + 2 * (lane % 4) + (e & 1);
        if (r < m && col < n) {
          y[static_cast<int64_t>(r) * n + col] = bias ? acc[i][j][e] + bias[col] : acc[i][j][e];
        }
      }
    }
  }
}

}  // namespace

bool linear_ordered_wants_bf16_x(WeightView w, int64_t k, int chunks) {
  return w.dtype == WeightDtype::kBf16 && (k / chunks) % kTcK == 0;
}

void launch_linear_ordered(const float* x, const uint16_t* x16, WeightView w, const float* bias,
                           float* y, int64_t m, int64_t n, int64_t k, int chunks,
                           cudaStream_t stream) {
  int top = 0;
  while ((1 << top) < chunks) ++top;
  const dim3 grid(static_cast<unsigned>((n + kOrdTile - 1) / kOrdTile),
                  static_cast<unsigned>((m + kOrdTile - 1) / kOrdTile));
  if (grid.y > 65535) {
    throw Error("cuda model ops: linear_ordered: m " + std::to_string(m) + " exceeds 65535 tiles");
  }
  const int M = static_cast<int>(m), N = static_cast<int>(n), K = static_cast<int>(k);
  const int run = K / chunks;
  if (x16 != nullptr) {
    const dim3 tc_grid(static_cast<unsigned>((n + kTcN - 1) / kTcN),
                       static_cast<unsigned>((m + kTcM - 1) / kTcM));
    linear_ordered_tc_kernel<<<tc_grid, kOrdThreads, 0, stream>>>(
        x16, static_cast<const uint16_t*>(w.data), bias, y, M, N, K, run, chunks);
    FP8KV_CUDA_CHECK_LAUNCH("linear_ordered_tc_kernel");
  } else if (w.dtype == WeightDtype::kBf16) {
    linear_ordered_kernel<uint16_t><<<grid, kOrdThreads, 0, stream>>>(
        x, static_cast<const uint16_t*>(w.data), bias, y, M, N, K, run, chunks, top);
  } else {
    linear_ordered_kernel<float><<<grid, kOrdThreads, 0, stream>>>(
        x, static_cast<const float*>(w.data), bias, y, M, N, K, run, chunks, top);
  }
  FP8KV_CUDA_CHECK_LAUNCH("linear_ordered_kernel");
}

}  // namespace fp8kv::cuda
