// ModelOps on the GPU: the non-attention ops of the model runner on fp32 activations in device
// memory, queued on the backend's stream. The CPU twin is runtime/cpu_model_ops.cpp (same
// semantics; tests/cuda/model_ops_test.cpp compares the two op by op).
//
// linear: cuBLAS. With bf16 weights (the GPU's choice: half the bytes of a memory-bound decode
// GEMM) x is rounded to bf16 into a scratch buffer and cublasGemmEx runs bf16 x bf16 with fp32
// accumulation and fp32 output; with fp32 weights it is a plain fp32 GEMM (no TF32). Row-major
// y[m, n] = x[m, k] . w[n, k]^T is the column-major y^T[n, m] = w^T . x^T, i.e. op(A) = W^T with
// A = w as a column-major [k, n] matrix (lda = k), B = x^T as a column-major [k, m] (ldb = k).
// The rest are one simple kernel each, grid-stride over elements or one block per row.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <climits>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>

#include "fp8kv/backend.h"
#include "fp8kv/error.h"
#include "fp8kv/fp8.h"
#include "fp8kv/model_ops.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/ordered_linear.h"
#include "kernels/ordered_linear.h"

namespace fp8kv {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kRowThreads = 256;  // one block per row (rms_norm)

// Blocks for a grid-stride loop over n elements.
unsigned grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65536 ? (blocks < 1 ? 1 : blocks) : 65536);
}

void check_cublas(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS) {
    throw Error(std::string("cuBLAS error in ") + what + ": " + cublasGetStatusName(s) + ": " +
                cublasGetStatusString(s));
  }
}

// ---- kernels ----------------------------------------------------------------------------------

// y[i] = bf16(x[i]), round to nearest even: fp8.h's shared conversion, so NaN payloads too are
// the CPU twin's bytes.
__global__ void to_bf16_kernel(const float* __restrict__ x, uint16_t* __restrict__ y, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    y[i] = fp8kv::float_to_bf16(x[i]);
  }
}

__global__ void from_bf16_kernel(const uint16_t* __restrict__ x, float* __restrict__ y, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    y[i] = fp8kv::bf16_to_float(x[i]);
  }
}

// y[i] += x[i].
__global__ void add_kernel(float* __restrict__ y, const float* __restrict__ x, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    y[i] += x[i];
  }
}

// y[r, j] += bias[j]; y [m, n].
__global__ void add_bias_kernel(float* __restrict__ y, const float* __restrict__ bias, int64_t m,
                                int64_t n) {
  const int64_t total = m * n;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    y[i] += bias[i % n];
  }
}

// Block-wide sum over kRowThreads threads; every thread gets the result.
__device__ float block_sum(float v, float* smem /* [kRowThreads / 32] */) {
  v = warp_sum(v);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  float t = lane < kRowThreads / 32 ? smem[lane] : 0.0f;
  t = warp_sum(t);
  __syncthreads();  // smem is reused by the caller's next reduction
  return t;
}

// y = v (float) or bf16(v) (uint16_t: round to nearest even, as to_bf16_kernel).
template <typename T>
__device__ __forceinline__ void store_as(T* y, float v) {
  if constexpr (sizeof(T) == 2) {
    *y = fp8kv::float_to_bf16(v);
  } else {
    *y = v;
  }
}

// Four fp32 values of a row -> y (fp32, or bf16 rounded as to_bf16_kernel), one store.
template <typename T>
__device__ __forceinline__ void store4_as(T* y, float4 v) {
  if constexpr (sizeof(T) == 2) {
    uint2 u;
    u.x = fp8kv::float_to_bf16(v.x) | static_cast<uint32_t>(fp8kv::float_to_bf16(v.y)) << 16;
    u.y = fp8kv::float_to_bf16(v.z) | static_cast<uint32_t>(fp8kv::float_to_bf16(v.w)) << 16;
    *reinterpret_cast<uint2*>(y) = u;
  } else {
    *reinterpret_cast<float4*>(y) = v;
  }
}

// The row kernels below read and write 4 values per access where the host found every row
// 16-byte aligned (kVec: dim % 4 == 0 and aligned pointers; rows_aligned()); a thread's sum of
// squares then runs over its float4s in order, the same order in rms_norm_kernel and
// add_rms_norm_kernel, so the fused kernel keeps the bits of add + rms_norm either way. The
// scalar form stays for other dims.

// The second pass of both norm kernels: y = x * inv * w over the block's row, inv from the
// row's sum of squares ss as the CPU twin computes it (1 / sqrt in double of the mean square).
template <typename T, bool kVec>
__device__ __forceinline__ void store_normed_row(const float* xr, const float* __restrict__ w,
                                                 T* __restrict__ yr, int dim, float ss, float eps) {
  const float inv = static_cast<float>(1.0 / sqrt(static_cast<double>(ss) / dim + eps));
  if constexpr (kVec) {
    const float4* x4 = reinterpret_cast<const float4*>(xr);
    const float4* w4 = reinterpret_cast<const float4*>(w);
#pragma unroll 4
    for (int i = threadIdx.x; i < dim / 4; i += kRowThreads) {
      const float4 v = x4[i], g = w4[i];
      store4_as(yr + 4 * i,
                make_float4(v.x * inv * g.x, v.y * inv * g.y, v.z * inv * g.z, v.w * inv * g.w));
    }
  } else {
    for (int i = threadIdx.x; i < dim; i += kRowThreads) store_as(yr + i, xr[i] * inv * w[i]);
  }
}

// One block per row: y = x / sqrt(mean(x^2) + eps) * w. x, y [rows, dim], w [dim]; y fp32 or
// bf16 (T).
template <typename T, bool kVec>
__global__ void rms_norm_kernel(const float* __restrict__ x, const float* __restrict__ w,
                                T* __restrict__ y, int dim, float eps) {
  __shared__ float smem[kRowThreads / 32];
  const float* xr = x + static_cast<int64_t>(blockIdx.x) * dim;
  T* yr = y + static_cast<int64_t>(blockIdx.x) * dim;
  float ss = 0.0f;
  if constexpr (kVec) {
    const float4* x4 = reinterpret_cast<const float4*>(xr);
#pragma unroll 4
    for (int i = threadIdx.x; i < dim / 4; i += kRowThreads) {
      const float4 v = x4[i];
      ss += v.x * v.x;
      ss += v.y * v.y;
      ss += v.z * v.z;
      ss += v.w * v.w;
    }
  } else {
    for (int i = threadIdx.x; i < dim; i += kRowThreads) ss += xr[i] * xr[i];
  }
  ss = block_sum(ss, smem);
  store_normed_row<T, kVec>(xr, w, yr, dim, ss, eps);
}

// rms_norm_kernel after the residual add: x += a (written back), then y = norm(x) * w, with
// rms_norm_kernel's arithmetic on the sums (the same bits as add_kernel, then rms_norm_kernel).
template <typename T, bool kVec>
__global__ void add_rms_norm_kernel(float* __restrict__ x, const float* __restrict__ a,
                                    const float* __restrict__ w, T* __restrict__ y, int dim,
                                    float eps) {
  __shared__ float smem[kRowThreads / 32];
  float* xr = x + static_cast<int64_t>(blockIdx.x) * dim;
  const float* ar = a + static_cast<int64_t>(blockIdx.x) * dim;
  T* yr = y + static_cast<int64_t>(blockIdx.x) * dim;
  float ss = 0.0f;
  if constexpr (kVec) {
    float4* x4 = reinterpret_cast<float4*>(xr);
    const float4* a4 = reinterpret_cast<const float4*>(ar);
#pragma unroll 4
    for (int i = threadIdx.x; i < dim / 4; i += kRowThreads) {
      const float4 u = x4[i], b = a4[i];
      const float4 v = make_float4(u.x + b.x, u.y + b.y, u.z + b.z, u.w + b.w);
      x4[i] = v;  // read back below by this thread only
      ss += v.x * v.x;
      ss += v.y * v.y;
      ss += v.z * v.z;
      ss += v.w * v.w;
    }
  } else {
    for (int i = threadIdx.x; i < dim; i += kRowThreads) {
      const float v = xr[i] + ar[i];
      xr[i] = v;  // read back below by this thread only
      ss += v * v;
    }
  }
  ss = block_sum(ss, smem);
  store_normed_row<T, kVec>(xr, w, yr, dim, ss, eps);
}

// One thread per (row, frequency i < D/2), over every head of the row: HF rotate_half, element
// i pairs with i + D/2. The angle and its cos/sin in double, as the CPU twin: position *
// frequency loses digits in fp32 at long positions (16k * 1.0 rad has an ulp of 1e-3).
__global__ void rope_kernel(float* __restrict__ x, int64_t rows, int64_t row_stride, int heads,
                            int head_dim, const int32_t* __restrict__ positions,
                            const float* __restrict__ inv_freq) {
  const int half = head_dim / 2;
  const int64_t total = rows * half;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = t / half;
    const int i = static_cast<int>(t % half);
    double sd, cd;
    sincos(static_cast<double>(positions[r]) * inv_freq[i], &sd, &cd);
    const float cs = static_cast<float>(cd), sn = static_cast<float>(sd);
    float* row = x + r * row_stride;
    for (int h = 0; h < heads; ++h) {
      float* v = row + static_cast<int64_t>(h) * head_dim;
      const float a = v[i], b = v[i + half];
      v[i] = a * cs - b * sn;
      v[i + half] = b * cs + a * sn;
    }
  }
}

// rope_kernel into a bf16 copy: y = bf16(rope(x)), x unchanged, `width` columns of each row
// (the columns past the rotated heads copied); rope_kernel's arithmetic, so the bits of
// rope_kernel, then to_bf16. x [rows, x_stride] (a column range of the QKV projection's rows),
// y [rows, width]. A launch covers one or two such column ranges of the same rows (rope_bf16: one;
// rope_qkv_bf16: the Q and the KV columns, one launch where there were two). One thread per pair
// of a row: the rotated pair (i, i + D/2) of head h, or two adjacent columns past the heads; a
// decode step's few rows still fill the GPU.
struct RopePart {
  const float* x = nullptr;  // the range's first column of row 0
  uint16_t* y = nullptr;     // [rows, width]
  int64_t width = 0;         // 0: no second range
  int heads = 0;             // rotated heads at the front of the range
};

__global__ void rope_bf16_kernel(RopePart p0, RopePart p1, int64_t x_stride, int64_t rows,
                                 int head_dim, const int32_t* __restrict__ positions,
                                 const float* __restrict__ inv_freq) {
  const int half = head_dim / 2;
  const int64_t pairs0 = p0.width / 2, pairs = pairs0 + p1.width / 2;
  const int64_t total = rows * pairs;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = t / pairs;
    int64_t j = t % pairs;
    const bool second = j >= pairs0;
    if (second) j -= pairs0;  // fields picked one by one: no local copy of a parameter
    const int64_t width = second ? p1.width : p0.width;
    const int64_t rotated = static_cast<int64_t>(second ? p1.heads : p0.heads) * half;
    const float* __restrict__ row = (second ? p1.x : p0.x) + r * x_stride;
    uint16_t* __restrict__ out = (second ? p1.y : p0.y) + r * width;
    if (j < rotated) {
      const int h = static_cast<int>(j / half), i = static_cast<int>(j % half);
      double sd, cd;
      sincos(static_cast<double>(positions[r]) * inv_freq[i], &sd, &cd);
      const float cs = static_cast<float>(cd), sn = static_cast<float>(sd);
      const int64_t c = static_cast<int64_t>(h) * head_dim + i;
      const float a = row[c], b = row[c + half];
      out[c] = fp8kv::float_to_bf16(a * cs - b * sn);
      out[c + half] = fp8kv::float_to_bf16(b * cs + a * sn);
    } else {
      const int64_t c = 2 * rotated + 2 * (j - rotated);
      out[c] = fp8kv::float_to_bf16(row[c]);
      out[c + 1] = fp8kv::float_to_bf16(row[c + 1]);
    }
  }
}

// out[r, i] = silu(gu[r, i]) * gu[r, inter + i]; out fp32 or bf16 (T).
template <typename T>
__global__ void silu_mul_kernel(const float* __restrict__ gu, T* __restrict__ out, int64_t rows,
                                int64_t inter) {
  const int64_t total = rows * inter;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = t / inter, i = t % inter;
    const float g = gu[r * 2 * inter + i];
    store_as(out + t, g / (1.0f + expf(-g)) * gu[r * 2 * inter + inter + i]);
  }
}

// silu_mul_kernel 4 columns per thread where the rows are 16-byte aligned (inter % 4 == 0, the
// pointers aligned: rows_aligned): block x covers kThreads column quads of every row it strides
// over (rows from blockIdx.y by gridDim.y), so no thread divides its index; each value is
// silu_mul_kernel's expression, so the same bits.
template <typename T>
__global__ void silu_mul_vec_kernel(const float* __restrict__ gu, T* __restrict__ out, int64_t rows,
                                    int quads) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= quads) return;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const float4* row = reinterpret_cast<const float4*>(gu + r * 8 * quads);
    const float4 g = row[c], u = row[quads + c];
    store4_as(out + r * 4 * quads + 4 * c,
              make_float4(g.x / (1.0f + expf(-g.x)) * u.x, g.y / (1.0f + expf(-g.y)) * u.y,
                          g.z / (1.0f + expf(-g.z)) * u.z, g.w / (1.0f + expf(-g.w)) * u.w));
  }
}

// out[i, :] = src[rows[i], :]; the source rows fp32 (T = float) or bf16 (T = uint16_t).
template <typename T>
__global__ void gather_rows_kernel(const T* __restrict__ src, const int32_t* __restrict__ rows,
                                   float* __restrict__ out, int64_t n, int64_t dim) {
  const int64_t total = n * dim;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = t / dim, j = t % dim;
    const T v = src[static_cast<int64_t>(rows[i]) * dim + j];
    if constexpr (sizeof(T) == 2) {
      out[t] = fp8kv::bf16_to_float(v);
    } else {
      out[t] = v;
    }
  }
}

// argmax: one block of kArgmaxThreads per row; each thread scans its share of the row in
// increasing index order (4-wide loads, four in flight, where the rows are 16-byte aligned), then
// the block reduces the (value, index) pairs. The first index of the largest value, the CPU
// twin's rule (`l[i] > l[best]` scanning from 0): NaN never wins, except that a NaN at index 0 is
// kept (nothing compares greater than it), so that row answers 0.
constexpr int kArgmaxThreads = 1024;

struct ArgBest {
  float v = -INFINITY;
  int64_t i = LLONG_MAX;  // none yet
  // One more element in this thread's increasing order: strictly greater, or the first -inf;
  // NaN compares false and is skipped.
  __device__ void take(float x, int64_t j) {
    if (x > v || (i == LLONG_MAX && x == v)) v = x, i = j;
  }
  // Another thread's pick: the larger value, on a tie the smaller index.
  __device__ void merge(float ov, int64_t oi) {
    if (oi != LLONG_MAX && (i == LLONG_MAX || ov > v || (ov == v && oi < i))) v = ov, i = oi;
  }
};

template <bool kVec>
__global__ void __launch_bounds__(kArgmaxThreads)
    argmax_kernel(const float* __restrict__ logits, int32_t* __restrict__ out, int64_t vocab) {
  const float* l = logits + static_cast<int64_t>(blockIdx.x) * vocab;
  ArgBest best;
  if constexpr (kVec) {
    const float4* l4 = reinterpret_cast<const float4*>(l);
    const int64_t quads = vocab / 4;
    auto take4 = [&](float4 q, int64_t c) {
      best.take(q.x, 4 * c);
      best.take(q.y, 4 * c + 1);
      best.take(q.z, 4 * c + 2);
      best.take(q.w, 4 * c + 3);
    };
    int64_t c = threadIdx.x;
    for (; c + 3 * kArgmaxThreads < quads; c += 4 * kArgmaxThreads) {
      float4 q[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) q[k] = __ldg(l4 + c + k * kArgmaxThreads);
#pragma unroll
      for (int k = 0; k < 4; ++k) take4(q[k], c + k * kArgmaxThreads);
    }
    for (; c < quads; c += kArgmaxThreads) take4(__ldg(l4 + c), c);
  } else {
    for (int64_t i = threadIdx.x; i < vocab; i += kArgmaxThreads) best.take(l[i], i);
  }
  for (int off = 16; off > 0; off >>= 1) {
    best.merge(__shfl_down_sync(0xffffffffu, best.v, off),
               __shfl_down_sync(0xffffffffu, best.i, off));
  }
  __shared__ float sv[kArgmaxThreads / 32];
  __shared__ int64_t si[kArgmaxThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) sv[warp] = best.v, si[warp] = best.i;
  __syncthreads();
  if (warp == 0) {
    best = ArgBest();
    if (lane < kArgmaxThreads / 32) best.merge(sv[lane], si[lane]);
    for (int off = 16; off > 0; off >>= 1) {
      best.merge(__shfl_down_sync(0xffffffffu, best.v, off),
                 __shfl_down_sync(0xffffffffu, best.i, off));
    }
    if (lane == 0) {
      out[blockIdx.x] = (isnan(l[0]) || best.i == LLONG_MAX) ? 0 : static_cast<int32_t>(best.i);
    }
  }
}

// ---- the ops ----------------------------------------------------------------------------------

void require(bool ok, const std::string& what) {
  if (!ok) throw Error("cuda model ops: " + what);
}

class CudaModelOps final : public ModelOps {
 public:
  explicit CudaModelOps(cudaStream_t stream) : stream_(stream) {
    check_cublas(cublasCreate(&handle_), "cublasCreate");
    check_cublas(cublasSetStream(handle_, stream_), "cublasSetStream");
    // Full fp32 for fp32 GEMMs (no TF32), so fp32 weights give fp32 results.
    check_cublas(cublasSetMathMode(handle_, CUBLAS_DEFAULT_MATH), "cublasSetMathMode");
  }
  ~CudaModelOps() override {
    cudaStreamSynchronize(stream_);
    cublasDestroy(handle_);
    cudaFree(x16_);
    cudaFree(cublas_workspace_);
  }

  void prepare_capture() override {
    if (cublas_workspace_ != nullptr) return;
    FP8KV_CUDA_CHECK(cudaMalloc(&cublas_workspace_, kCublasWorkspaceBytes));
    check_cublas(cublasSetWorkspace(handle_, cublas_workspace_, kCublasWorkspaceBytes),
                 "cublasSetWorkspace");
  }
  uint64_t memory_epoch() const override { return epoch_; }

  void linear(const float* x, WeightView w, const float* bias, float* y, int64_t m, int64_t n,
              int64_t k) override {
    if (!check_linear("linear", x, w, y, m, n, k)) return;
    const float alpha = 1.0f, beta = 0.0f;
    const int M = static_cast<int>(m), N = static_cast<int>(n), K = static_cast<int>(k);
    if (w.dtype == WeightDtype::kBf16) {
      round_x_to_bf16(x, m * k);
      gemm_bf16(x16_, w, y, M, N, K);
    } else {
      check_cublas(cublasGemmEx(handle_, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &alpha, w.data,
                                CUDA_R_32F, K, x, CUDA_R_32F, K, &beta, y, CUDA_R_32F, N,
                                CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                   "cublasGemmEx (fp32 linear)");
    }
    add_bias(y, bias, m, n);
  }

  bool bf16_gemm_inputs() const override { return true; }

  void linear_bf16(const uint16_t* x16, WeightView w, const float* bias, float* y, int64_t m,
                   int64_t n, int64_t k) override {
    require(w.dtype == WeightDtype::kBf16, "linear_bf16: needs bf16 weights");
    if (!check_linear("linear_bf16", x16, w, y, m, n, k)) return;
    gemm_bf16(x16, w, y, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k));
    add_bias(y, bias, m, n);
  }

  void rms_norm_bf16(const float* x, const float* w, uint16_t* y16, int64_t rows, int dim,
                     float eps) override {
    launch_rms_norm(x, w, y16, rows, dim, eps, "rms_norm_bf16");
  }

  void silu_mul_bf16(const float* gate_up, uint16_t* out16, int64_t rows, int64_t inter) override {
    launch_silu_mul(gate_up, out16, rows, inter);
    FP8KV_CUDA_CHECK_LAUNCH("silu_mul_kernel (bf16)");
  }

  void add_rms_norm_bf16(float* x, const float* a, const float* w, uint16_t* y16, int64_t rows,
                         int dim, float eps) override {
    require(rows >= 0 && dim > 0, "add_rms_norm_bf16: bad shape");
    require(rows <= INT_MAX, "add_rms_norm_bf16: more than INT_MAX rows");
    if (rows == 0) return;
    const unsigned grid = static_cast<unsigned>(rows);
    if (rows_aligned(dim, {x, a, w, y16})) {
      add_rms_norm_kernel<uint16_t, true>
          <<<grid, kRowThreads, 0, stream_>>>(x, a, w, y16, dim, eps);
    } else {
      add_rms_norm_kernel<uint16_t, false>
          <<<grid, kRowThreads, 0, stream_>>>(x, a, w, y16, dim, eps);
    }
    FP8KV_CUDA_CHECK_LAUNCH("add_rms_norm_kernel");
  }

  void rope_bf16(const float* x, int64_t x_stride, uint16_t* y16, int64_t rows, int64_t width,
                 int heads, int head_dim, const int32_t* positions,
                 const float* inv_freq) override {
    require(head_dim > 0 && head_dim % 2 == 0 && head_dim <= 1024,
            "rope_bf16: head_dim " + std::to_string(head_dim) + " must be even and <= 1024");
    require(width % 2 == 0 && static_cast<int64_t>(heads) * head_dim <= width && width <= x_stride,
            "rope_bf16: width " + std::to_string(width) + " must be even, hold the " +
                std::to_string(heads) + " heads of " + std::to_string(head_dim) +
                " and fit the row stride " + std::to_string(x_stride));
    if (rows == 0 || width == 0) return;
    launch_rope_bf16({x, y16, width, heads}, {}, x_stride, rows, head_dim, positions, inv_freq);
  }

  void rope_qkv_bf16(const float* qkv, int64_t rows, int q_heads, int kv_heads, int head_dim,
                     uint16_t* q16, uint16_t* kv16, const int32_t* positions,
                     const float* inv_freq) override {
    require(head_dim > 0 && head_dim % 2 == 0 && head_dim <= 1024 && q_heads > 0 && kv_heads > 0,
            "rope_qkv_bf16: head_dim " + std::to_string(head_dim) + " (even, <= 1024), " +
                std::to_string(q_heads) + " Q heads and " + std::to_string(kv_heads) +
                " KV heads (both > 0)");
    if (rows == 0) return;
    const int64_t qd = static_cast<int64_t>(q_heads) * head_dim;
    const int64_t kvd = 2 * static_cast<int64_t>(kv_heads) * head_dim;
    launch_rope_bf16({qkv, q16, qd, q_heads}, {qkv + qd, kv16, kvd, kv_heads}, qd + kvd, rows,
                     head_dim, positions, inv_freq);
  }

  void linear_ordered(const float* x, WeightView w, const float* bias, float* y, int64_t m,
                      int64_t n, int64_t k, int chunks) override {
    check_ordered_shape(m, n, k, chunks);
    if (m == 0) return;
    require(x && w.data && y, "linear_ordered: null pointer");
    const uint16_t* x16 = nullptr;
    if (linear_ordered_wants_bf16_x(w, k, chunks)) {
      round_x_to_bf16(x, m * k);
      x16 = x16_;
    }
    launch_linear_ordered(x, x16, w, bias, y, m, n, k, chunks, stream_);
  }

  void rms_norm(const float* x, const float* w, float* y, int64_t rows, int dim,
                float eps) override {
    launch_rms_norm(x, w, y, rows, dim, eps, "rms_norm");
  }

  void rope(float* x, int64_t rows, int64_t row_stride, int heads, int head_dim,
            const int32_t* positions, const float* inv_freq) override {
    require(head_dim > 0 && head_dim % 2 == 0 && head_dim <= 1024,
            "rope: head_dim " + std::to_string(head_dim) + " must be even and <= 1024");
    require(static_cast<int64_t>(heads) * head_dim <= row_stride,
            "rope: heads * head_dim exceeds the row stride");
    if (rows == 0 || heads == 0) return;
    rope_kernel<<<grid_for(rows * (head_dim / 2)), kThreads, 0, stream_>>>(
        x, rows, row_stride, heads, head_dim, positions, inv_freq);
    FP8KV_CUDA_CHECK_LAUNCH("rope_kernel");
  }

  void silu_mul(const float* gate_up, float* out, int64_t rows, int64_t inter) override {
    launch_silu_mul(gate_up, out, rows, inter);
    FP8KV_CUDA_CHECK_LAUNCH("silu_mul_kernel");
  }

  void embedding(const int32_t* ids, WeightView table, float* out, int64_t tokens,
                 int64_t dim) override {
    if (tokens * dim == 0) return;
    if (table.dtype == WeightDtype::kBf16) {
      gather_rows_kernel<uint16_t><<<grid_for(tokens * dim), kThreads, 0, stream_>>>(
          static_cast<const uint16_t*>(table.data), ids, out, tokens, dim);
    } else {
      gather_rows_kernel<float><<<grid_for(tokens * dim), kThreads, 0, stream_>>>(
          static_cast<const float*>(table.data), ids, out, tokens, dim);
    }
    FP8KV_CUDA_CHECK_LAUNCH("gather_rows_kernel (embedding)");
  }

  void gather_rows(const float* src, const int32_t* rows, float* out, int64_t n,
                   int64_t dim) override {
    if (n * dim == 0) return;
    gather_rows_kernel<float><<<grid_for(n * dim), kThreads, 0, stream_>>>(src, rows, out, n, dim);
    FP8KV_CUDA_CHECK_LAUNCH("gather_rows_kernel");
  }

  void add(float* y, const float* x, int64_t n) override {
    if (n == 0) return;
    add_kernel<<<grid_for(n), kThreads, 0, stream_>>>(y, x, n);
    FP8KV_CUDA_CHECK_LAUNCH("add_kernel");
  }

  void to_bf16(const float* x, uint16_t* y, int64_t n) override {
    if (n == 0) return;
    to_bf16_kernel<<<grid_for(n), kThreads, 0, stream_>>>(x, y, n);
    FP8KV_CUDA_CHECK_LAUNCH("to_bf16_kernel");
  }

  void from_bf16(const uint16_t* x, float* y, int64_t n) override {
    if (n == 0) return;
    from_bf16_kernel<<<grid_for(n), kThreads, 0, stream_>>>(x, y, n);
    FP8KV_CUDA_CHECK_LAUNCH("from_bf16_kernel");
  }

  void argmax(const float* logits, int32_t* out, int64_t rows, int64_t vocab) override {
    require(vocab > 0 && rows >= 0 && rows <= INT_MAX, "argmax: bad shape");
    if (rows == 0) return;
    const bool vec = vocab % 4 == 0 && reinterpret_cast<uintptr_t>(logits) % 16 == 0;
    auto* kernel = vec ? argmax_kernel<true> : argmax_kernel<false>;
    kernel<<<static_cast<unsigned>(rows), kArgmaxThreads, 0, stream_>>>(logits, out, vocab);
    FP8KV_CUDA_CHECK_LAUNCH("argmax_kernel");
  }

 private:
  void launch_rope_bf16(RopePart p0, RopePart p1, int64_t x_stride, int64_t rows, int head_dim,
                        const int32_t* positions, const float* inv_freq) {
    rope_bf16_kernel<<<grid_for(rows * ((p0.width + p1.width) / 2)), kThreads, 0, stream_>>>(
        p0, p1, x_stride, rows, head_dim, positions, inv_freq);
    FP8KV_CUDA_CHECK_LAUNCH("rope_bf16_kernel");
  }

  // linear's and linear_bf16's shape and pointer checks; false when there is nothing to do (m 0).
  bool check_linear(const std::string& op, const void* x, WeightView w, const float* y, int64_t m,
                    int64_t n, int64_t k) {
    require(m >= 0 && n > 0 && k > 0, op + ": bad shape m " + std::to_string(m) + ", n " +
                                          std::to_string(n) + ", k " + std::to_string(k));
    require(m <= INT_MAX && n <= INT_MAX && k <= INT_MAX, op + ": a dimension exceeds INT_MAX");
    if (m == 0) return false;
    require(x && w.data && y, op + ": null pointer");
    return true;
  }
  // y[r, j] += bias[j] when there is a bias.
  void add_bias(float* y, const float* bias, int64_t m, int64_t n) {
    if (!bias) return;
    add_bias_kernel<<<grid_for(m * n), kThreads, 0, stream_>>>(y, bias, m, n);
    FP8KV_CUDA_CHECK_LAUNCH("add_bias_kernel");
  }

  // rms_norm_kernel into fp32 or bf16 (T) rows; `op` names the op in errors.
  template <typename T>
  void launch_rms_norm(const float* x, const float* w, T* y, int64_t rows, int dim, float eps,
                       const std::string& op) {
    require(rows >= 0 && dim > 0, op + ": bad shape");
    require(rows <= INT_MAX, op + ": more than INT_MAX rows");
    if (rows == 0) return;
    const unsigned grid = static_cast<unsigned>(rows);
    if (rows_aligned(dim, {x, w, y})) {
      rms_norm_kernel<T, true><<<grid, kRowThreads, 0, stream_>>>(x, w, y, dim, eps);
    } else {
      rms_norm_kernel<T, false><<<grid, kRowThreads, 0, stream_>>>(x, w, y, dim, eps);
    }
    FP8KV_CUDA_CHECK_LAUNCH("rms_norm_kernel");
  }

  // silu_mul_kernel into fp32 or bf16 (T): 4 columns per thread where rows_aligned allows.
  template <typename T>
  void launch_silu_mul(const float* gate_up, T* out, int64_t rows, int64_t inter) {
    if (rows * inter == 0) return;
    if (inter % 4 == 0 && inter / 4 <= INT_MAX && rows_aligned(4, {gate_up, out})) {
      const int quads = static_cast<int>(inter / 4);
      const dim3 grid(static_cast<unsigned>((quads + kThreads - 1) / kThreads),
                      static_cast<unsigned>(rows < 65535 ? rows : 65535));
      silu_mul_vec_kernel<T><<<grid, kThreads, 0, stream_>>>(gate_up, out, rows, quads);
    } else {
      silu_mul_kernel<T>
          <<<grid_for(rows * inter), kThreads, 0, stream_>>>(gate_up, out, rows, inter);
    }
  }

  // Whether rows of `dim` values at these pointers take the row kernels' 4-wide accesses: dim a
  // multiple of 4 and every pointer 16-byte aligned (so each row is: fp32 rows of 16 bytes a
  // 4-group; bf16 outputs need 8, implied).
  static bool rows_aligned(int dim, std::initializer_list<const void*> ptrs) {
    if (dim % 4 != 0) return false;
    for (const void* p : ptrs) {
      if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
    }
    return true;
  }

  // y[M, N] = x16[M, K] . w[N, K]^T, bf16 operands, fp32 accumulate and output.
  void gemm_bf16(const uint16_t* x16, WeightView w, float* y, int M, int N, int K) {
    const float alpha = 1.0f, beta = 0.0f;
    check_cublas(cublasGemmEx(handle_, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &alpha, w.data,
                              CUDA_R_16BF, K, x16, CUDA_R_16BF, K, &beta, y, CUDA_R_32F, N,
                              CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                 "cublasGemmEx (bf16 linear)");
  }

  // x16_ = bf16(x), n elements, queued on the stream (grown as needed).
  void round_x_to_bf16(const float* x, int64_t n) {
    const size_t need = static_cast<size_t>(n) * sizeof(uint16_t);
    if (need > x16_bytes_) {
      // Queued GEMMs may still read the old buffer: cudaFree waits for the device anyway, but
      // say so.
      FP8KV_CUDA_CHECK(cudaStreamSynchronize(stream_));
      FP8KV_CUDA_CHECK(cudaFree(x16_));
      ++epoch_;  // a recorded GEMM may point at the old buffer
      x16_ = nullptr;
      x16_bytes_ = 0;
      FP8KV_CUDA_CHECK(cudaMalloc(&x16_, need));
      x16_bytes_ = need;
    }
    to_bf16_kernel<<<grid_for(n), kThreads, 0, stream_>>>(x, x16_, n);
    FP8KV_CUDA_CHECK_LAUNCH("to_bf16_kernel (linear)");
  }

  cudaStream_t stream_;
  cublasHandle_t handle_ = nullptr;
  uint16_t* x16_ = nullptr;  // [m, k] bf16 copy of linear's x
  size_t x16_bytes_ = 0;
  // prepare_capture's workspace: the size of cuBLAS's own default pool on Hopper, so that its
  // heuristics have the room they have without it.
  static constexpr size_t kCublasWorkspaceBytes = size_t{32} << 20;
  void* cublas_workspace_ = nullptr;
  uint64_t epoch_ = 0;
};

}  // namespace
}  // namespace cuda

std::unique_ptr<ModelOps> make_cuda_model_ops(Backend& backend, void* stream) {
  if (backend.name().rfind("cuda", 0) != 0) {
    throw Error("make_cuda_model_ops: needs the CUDA backend, got '" + backend.name() + "'");
  }
  return std::make_unique<cuda::CudaModelOps>(static_cast<cudaStream_t>(stream));
}

}  // namespace fp8kv
