// ModelOps on the CPU: cblas_sgemm when a BLAS is linked (FP8KV_HAVE_BLAS), OpenMP loops
// otherwise; everything else is OpenMP over rows. bf16 weights (the GPU's choice, accepted here
// so the CPU twin can run the same model) are widened to fp32 first.
#include "fp8kv/model_ops.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "fp8kv/error.h"
#include "fp8kv/fp8.h"
#include "kernels/ordered_linear.h"

#if defined(FP8KV_HAVE_BLAS)
#include <cblas.h>
#endif

namespace fp8kv {
namespace {

// Below this many elements a loop runs on one thread: forking and joining a team costs more
// than the work (decode steps of small models), and much more on a busy machine.
constexpr int64_t kParallelMin = 1 << 16;

// The weight as fp32: `w` itself, or its n elements widened into `tmp`.
const float* as_f32(WeightView w, int64_t n, std::vector<float>& tmp) {
  if (w.dtype == WeightDtype::kF32) return static_cast<const float*>(w.data);
  const uint16_t* b = static_cast<const uint16_t*>(w.data);
  tmp.resize(static_cast<size_t>(n));
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) tmp[static_cast<size_t>(i)] = bf16_to_float(b[i]);
  return tmp.data();
}

#if !defined(FP8KV_HAVE_BLAS)
// y[m, n] = x[m, k] . w[n, k]^T: both operands run along k, so the inner loop is a contiguous
// dot product. Blocks of rows of w stay in cache while every row of x passes over them.
void gemm_xwt(const float* x, const float* w, float* y, int64_t m, int64_t n, int64_t k) {
  constexpr int64_t kBlockN = 64;
  const int64_t nb = (n + kBlockN - 1) / kBlockN;
#pragma omp parallel for collapse(2) schedule(static) if (m * n * k >= kParallelMin * 16)
  for (int64_t jb = 0; jb < nb; ++jb) {
    for (int64_t i = 0; i < m; ++i) {
      const float* xi = x + i * k;
      const int64_t j_end = std::min(n, (jb + 1) * kBlockN);
      for (int64_t j = jb * kBlockN; j < j_end; ++j) {
        const float* wj = w + j * k;
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t t = 0; t < k; ++t) acc += xi[t] * wj[t];
        y[i * n + j] = acc;
      }
    }
  }
}
#endif

class CpuModelOps final : public ModelOps {
 public:
  CpuModelOps() {
#if defined(OPENBLAS_VERSION)
    // OpenBLAS's own threads and OpenMP's spin against each other on a small machine (each
    // team busy-waits while the other needs the cores). One pool only: OpenBLAS runs single
    // threaded inside OpenMP threads that split the GEMM's output columns.
    openblas_set_num_threads(1);
#endif
  }

  void linear(const float* x, WeightView wv, const float* bias, float* y, int64_t m, int64_t n,
              int64_t k) override {
    if (m == 0) return;
    std::vector<float> widened;
    const float* w = as_f32(wv, n * k, widened);
#if defined(FP8KV_HAVE_BLAS)
    // Column blocks of y (rows of w), a multiple of 64 wide, one per thread.
    const bool parallel = m * n * k >= kParallelMin * 16;
#pragma omp parallel if (parallel)
    {
      const int64_t threads = omp_get_num_threads();
      const int64_t t = omp_get_thread_num();
      const int64_t block = ((n + threads - 1) / threads + 63) / 64 * 64;
      const int64_t j0 = std::min(n, t * block), j1 = std::min(n, j0 + block);
      if (j1 > j0) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(m),
                    static_cast<int>(j1 - j0), static_cast<int>(k), 1.0f, x, static_cast<int>(k),
                    w + j0 * k, static_cast<int>(k), 0.0f, y + j0, static_cast<int>(n));
      }
    }
#else
    gemm_xwt(x, w, y, m, n, k);
#endif
    if (bias) {
#pragma omp parallel for schedule(static) if (m * n >= kParallelMin)
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t j = 0; j < n; ++j) y[i * n + j] += bias[j];
      }
    }
  }

  // The twin of the CUDA kernel, operation for operation: with bf16 weights every product of
  // two bf16 values is exact in fp32, so a multiply and an add here round as the GPU's fused
  // multiply-add does, and the two give the same bits.
  void linear_ordered(const float* x, WeightView wv, const float* bias, float* y, int64_t m,
                      int64_t n, int64_t k, int chunks) override {
    check_ordered_shape(m, n, k, chunks);
    if (m == 0) return;
    std::vector<float> widened, rounded;
    const float* w = as_f32(wv, n * k, widened);
    const float* xs = x;
    if (wv.dtype == WeightDtype::kBf16) {
      rounded.resize(static_cast<size_t>(m * k));
      for (int64_t i = 0; i < m * k; ++i) rounded[i] = bf16_to_float(float_to_bf16(x[i]));
      xs = rounded.data();
    }
    const int64_t run = k / chunks;
    int top = 0;
    while ((1 << top) < chunks) ++top;
    // Eight output columns at a time: eight independent running sums, each still in its own
    // fixed order (one dependent chain alone would wait on every add's latency).
    constexpr int64_t kCols = 8;
    const int64_t col_blocks = (n + kCols - 1) / kCols;
#pragma omp parallel for collapse(2) schedule(static) if (m * n * k >= kParallelMin * 16)
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t jb = 0; jb < col_blocks; ++jb) {
        const float* xi = xs + i * k;
        const int64_t j0 = jb * kCols, cols = std::min(kCols, n - j0);
        float stack[kMaxOrderedLevels + 1][kCols];
        for (int c = 0; c < chunks; ++c) {
          float acc[kCols] = {};
          for (int64_t t = c * run; t < (c + 1) * run; ++t) {
            for (int64_t jj = 0; jj < cols; ++jj) {
              const float p = xi[t] * w[(j0 + jj) * k + t];  // kept apart: no fma contraction
              acc[jj] = acc[jj] + p;
            }
          }
          // Binary-counter tree: run c closes one subtree per trailing one bit of c.
          int level = 0;
          for (; (c >> level) & 1; ++level) {
            for (int64_t jj = 0; jj < cols; ++jj) acc[jj] = stack[level][jj] + acc[jj];
          }
          for (int64_t jj = 0; jj < cols; ++jj) stack[level][jj] = acc[jj];
        }
        for (int64_t jj = 0; jj < cols; ++jj) {
          const float v = stack[top][jj];
          y[i * n + j0 + jj] = bias ? v + bias[j0 + jj] : v;
        }
      }
    }
  }

  void rms_norm(const float* x, const float* w, float* y, int64_t rows, int dim,
                float eps) override {
#pragma omp parallel for schedule(static) if (rows * dim >= kParallelMin)
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = x + r * dim;
      float* yr = y + r * dim;
      double ss = 0.0;
      for (int i = 0; i < dim; ++i) ss += static_cast<double>(xr[i]) * xr[i];
      const float inv = static_cast<float>(1.0 / std::sqrt(ss / dim + eps));
      for (int i = 0; i < dim; ++i) yr[i] = xr[i] * inv * w[i];
    }
  }

  // The bf16-input forms: the fp32 op, then the rounding (or the widening) on the host.
  void linear_bf16(const uint16_t* x16, WeightView wv, const float* bias, float* y, int64_t m,
                   int64_t n, int64_t k) override {
    if (wv.dtype != WeightDtype::kBf16) throw Error("linear_bf16: needs bf16 weights");
    std::vector<float> x(static_cast<size_t>(m * k));
    for (size_t i = 0; i < x.size(); ++i) x[i] = bf16_to_float(x16[i]);
    linear(x.data(), wv, bias, y, m, n, k);
  }
  void rms_norm_bf16(const float* x, const float* w, uint16_t* y16, int64_t rows, int dim,
                     float eps) override {
    std::vector<float> y(static_cast<size_t>(rows) * dim);
    rms_norm(x, w, y.data(), rows, dim, eps);
    for (size_t i = 0; i < y.size(); ++i) y16[i] = float_to_bf16(y[i]);
  }
  void silu_mul_bf16(const float* gate_up, uint16_t* out16, int64_t rows, int64_t inter) override {
    std::vector<float> out(static_cast<size_t>(rows * inter));
    silu_mul(gate_up, out.data(), rows, inter);
    for (size_t i = 0; i < out.size(); ++i) out16[i] = float_to_bf16(out[i]);
  }

  void add_rms_norm_bf16(float* x, const float* a, const float* w, uint16_t* y16, int64_t rows,
                         int dim, float eps) override {
    add(x, a, rows * dim);
    rms_norm_bf16(x, w, y16, rows, dim, eps);
  }
  void rope_bf16(const float* x, int64_t x_stride, uint16_t* y16, int64_t rows, int64_t width,
                 int heads, int head_dim, const int32_t* positions,
                 const float* inv_freq) override {
    if (head_dim <= 0 || head_dim % 2 != 0 || head_dim > 1024) {
      throw Error("rope_bf16: head_dim " + std::to_string(head_dim) + " must be even and <= 1024");
    }
    if (width % 2 != 0 || static_cast<int64_t>(heads) * head_dim > width || width > x_stride) {
      throw Error("rope_bf16: width " + std::to_string(width) + " must be even, hold the " +
                  std::to_string(heads) + " heads of " + std::to_string(head_dim) +
                  " and fit the row stride " + std::to_string(x_stride));
    }
    // The rows gathered dense, then rope and the rounding: rope's arithmetic, element for element.
    std::vector<float> r(static_cast<size_t>(rows * width));
    for (int64_t i = 0; i < rows; ++i) {
      std::copy(x + i * x_stride, x + i * x_stride + width, r.begin() + i * width);
    }
    rope(r.data(), rows, width, heads, head_dim, positions, inv_freq);
    for (size_t i = 0; i < r.size(); ++i) y16[i] = float_to_bf16(r[i]);
  }

  void rope(float* x, int64_t rows, int64_t row_stride, int heads, int head_dim,
            const int32_t* positions, const float* inv_freq) override {
    const int half = head_dim / 2;
#pragma omp parallel for schedule(static) if (rows * heads * head_dim >= kParallelMin)
    for (int64_t r = 0; r < rows; ++r) {
      // The angle in double: position * frequency loses digits in fp32 at long positions.
      float cs[512], sn[512];  // head_dim <= 1024
      for (int i = 0; i < half; ++i) {
        const double a = static_cast<double>(positions[r]) * inv_freq[i];
        cs[i] = static_cast<float>(std::cos(a));
        sn[i] = static_cast<float>(std::sin(a));
      }
      for (int h = 0; h < heads; ++h) {
        float* v = x + r * row_stride + static_cast<int64_t>(h) * head_dim;
        for (int i = 0; i < half; ++i) {
          const float a = v[i], b = v[i + half];
          v[i] = a * cs[i] - b * sn[i];
          v[i + half] = b * cs[i] + a * sn[i];
        }
      }
    }
  }

  void silu_mul(const float* gate_up, float* out, int64_t rows, int64_t inter) override {
#pragma omp parallel for schedule(static) if (rows * inter >= kParallelMin)
    for (int64_t r = 0; r < rows; ++r) {
      const float* g = gate_up + r * 2 * inter;
      const float* u = g + inter;
      float* o = out + r * inter;
      for (int64_t i = 0; i < inter; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
    }
  }

  void embedding(const int32_t* ids, WeightView table, float* out, int64_t tokens,
                 int64_t dim) override {
    if (table.dtype == WeightDtype::kF32) {
      gather_rows(static_cast<const float*>(table.data), ids, out, tokens, dim);
      return;
    }
    const uint16_t* t = static_cast<const uint16_t*>(table.data);
#pragma omp parallel for schedule(static) if (tokens * dim >= kParallelMin)
    for (int64_t i = 0; i < tokens; ++i) {
      const uint16_t* row = t + static_cast<int64_t>(ids[i]) * dim;
      for (int64_t j = 0; j < dim; ++j) out[i * dim + j] = bf16_to_float(row[j]);
    }
  }

  void gather_rows(const float* src, const int32_t* rows, float* out, int64_t n,
                   int64_t dim) override {
#pragma omp parallel for schedule(static) if (n * dim >= kParallelMin)
    for (int64_t i = 0; i < n; ++i) {
      std::memcpy(out + i * dim, src + static_cast<int64_t>(rows[i]) * dim,
                  static_cast<size_t>(dim) * sizeof(float));
    }
  }

  void add(float* y, const float* x, int64_t n) override {
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
    for (int64_t i = 0; i < n; ++i) y[i] += x[i];
  }

  void to_bf16(const float* x, uint16_t* y, int64_t n) override {
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
    for (int64_t i = 0; i < n; ++i) y[i] = float_to_bf16(x[i]);
  }

  void from_bf16(const uint16_t* x, float* y, int64_t n) override {
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
    for (int64_t i = 0; i < n; ++i) y[i] = bf16_to_float(x[i]);
  }

  void argmax(const float* logits, int32_t* out, int64_t rows, int64_t vocab) override {
#pragma omp parallel for schedule(static) if (rows * vocab >= kParallelMin)
    for (int64_t r = 0; r < rows; ++r) {
      const float* l = logits + r * vocab;
      int64_t best = 0;
      for (int64_t i = 1; i < vocab; ++i) {
        if (l[i] > l[best]) best = i;
      }
      out[r] = static_cast<int32_t>(best);
    }
  }
};

}  // namespace

std::unique_ptr<ModelOps> make_cpu_model_ops() { return std::make_unique<CpuModelOps>(); }

}  // namespace fp8kv
