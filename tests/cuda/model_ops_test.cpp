// The CUDA ModelOps (kernels/cuda/model_ops.cu) against the CPU ModelOps, op by op, on random
// data and awkward sizes (1, 7, 19, 127, 1170, ...). Exact ops (gathers, conversions, add,
// argmax) must match bit for bit, NaN and infinities included; arithmetic ops are bounded by a
// normalized error ||gpu - cpu|| / ||cpu|| of fp32 reordering (1e-5); the bf16 linear is
// compared with the CPU GEMM on the same bf16-rounded x (fp32 reordering again) and with the
// fp32 x (the bf16 rounding of x: normalized error < 4e-3). No NaN passes a comparison.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "fp8kv/backend.h"
#include "fp8kv/buffer.h"
#include "fp8kv/error.h"
#include "fp8kv/fp8.h"
#include "fp8kv/model.h"
#include "gpu_skip.h"

namespace fp8kv {
namespace {

constexpr double kFp32Bound = 1e-5;

// RoPE frequencies of Llama 3 (theta 500000): inv_freq[i] = theta^(-2i / head_dim).
std::vector<float> llama3_inv_freq(int head_dim) {
  std::vector<float> f(static_cast<size_t>(head_dim / 2));
  for (int i = 0; i < head_dim / 2; ++i) {
    f[static_cast<size_t>(i)] = static_cast<float>(std::pow(500000.0, -2.0 * i / head_dim));
  }
  return f;
}

std::vector<float> random_floats(size_t n, uint32_t seed, float lo = -2.0f, float hi = 2.0f) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = d(gen);
  return v;
}

std::vector<uint16_t> to_bf16_host(const std::vector<float>& v) {
  std::vector<uint16_t> b(v.size());
  for (size_t i = 0; i < v.size(); ++i) b[i] = float_to_bf16(v[i]);
  return b;
}

// ||a - ref|| / ||ref|| in double; fails the test on any non-finite value in either.
double norm_err(const std::vector<float>& a, const std::vector<float>& ref,
                const std::string& what) {
  EXPECT_EQ(a.size(), ref.size()) << what;
  double d = 0, r = 0;
  size_t bad = 0;
  for (size_t i = 0; i < a.size() && i < ref.size(); ++i) {
    if (!std::isfinite(a[i]) || !std::isfinite(ref[i])) {
      if (bad++ == 0)
        ADD_FAILURE() << what << ": non-finite at " << i << ": " << a[i] << " vs " << ref[i];
      continue;
    }
    d += (static_cast<double>(a[i]) - ref[i]) * (static_cast<double>(a[i]) - ref[i]);
    r += static_cast<double>(ref[i]) * ref[i];
  }
  return r > 0 ? std::sqrt(d / r) : std::sqrt(d);
}

// The same data in the CPU backend's and the CUDA backend's memory.
class CudaModelOps : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!cuda_available()) return;
    cpu_ = make_cpu_backend();
    gpu_ = make_cuda_backend(0, nullptr);
    cpu_ops_ = make_cpu_model_ops();
    gpu_ops_ = make_cuda_model_ops(*gpu_, nullptr);
  }
  void TearDown() override {
    bufs_.clear();
    gpu_ops_.reset();
    cpu_ops_.reset();
  }

  struct Pair {
    void* cpu;
    void* gpu;
  };
  // A buffer of `bytes` on both backends, holding `host` (zeros when null).
  Pair both(const void* host, size_t bytes) {
    bufs_.emplace_back(*cpu_, bytes);
    void* c = bufs_.back().get();
    bufs_.emplace_back(*gpu_, bytes);
    void* g = bufs_.back().get();
    if (host) {
      std::memcpy(c, host, bytes);
      gpu_->upload(g, host, bytes);
    } else {
      std::memset(c, 0, bytes);
      gpu_->memset(g, 0, bytes);
    }
    return {c, g};
  }
  template <typename T>
  Pair both(const std::vector<T>& v) {
    return both(v.data(), v.size() * sizeof(T));
  }
  template <typename T>
  Pair zeros(size_t n) {
    return both(nullptr, n * sizeof(T));
  }
  template <typename T>
  std::vector<T> cpu_vec(const Pair& p, size_t n) {
    const T* c = static_cast<const T*>(p.cpu);
    return std::vector<T>(c, c + n);
  }
  template <typename T>
  std::vector<T> gpu_vec(const Pair& p, size_t n) {
    std::vector<T> v(n);
    gpu_->download(v.data(), p.gpu, n * sizeof(T));
    return v;
  }

  std::unique_ptr<Backend> cpu_, gpu_;
  std::unique_ptr<ModelOps> cpu_ops_, gpu_ops_;
  std::vector<BackendBuffer> bufs_;
};

TEST_F(CudaModelOps, LinearFp32WeightsMatchCpu) {
  SKIP_WITHOUT_GPU();
  for (int m : {1, 7, 19}) {
    for (int n : {1, 127, 1170}) {
      for (int k : {7, 64, 1000}) {
        for (bool with_bias : {false, true}) {
          const std::string what = "m " + std::to_string(m) + " n " + std::to_string(n) + " k " +
                                   std::to_string(k) + (with_bias ? " +bias" : "");
          const Pair x = both(random_floats(static_cast<size_t>(m) * k, 1 + m));
          const Pair w = both(random_floats(static_cast<size_t>(n) * k, 2 + n));
          const Pair b = both(random_floats(static_cast<size_t>(n), 3 + k));
          const Pair y = zeros<float>(static_cast<size_t>(m) * n);
          const float* bc = with_bias ? static_cast<const float*>(b.cpu) : nullptr;
          const float* bg = with_bias ? static_cast<const float*>(b.gpu) : nullptr;
          cpu_ops_->linear(static_cast<const float*>(x.cpu), {w.cpu, WeightDtype::kF32}, bc,
                           static_cast<float*>(y.cpu), m, n, k);
          gpu_ops_->linear(static_cast<const float*>(x.gpu), {w.gpu, WeightDtype::kF32}, bg,
                           static_cast<float*>(y.gpu), m, n, k);
          const size_t mn = static_cast<size_t>(m) * n;
          // Two fp32 GEMMs that sum in different orders differ by up to ~k u sum|x||w| per
          // element, which is unrelated to |y| when the terms cancel (m 1 n 1 k 7 on the H100
          // gave 1.003e-5 relative to |y|). So the error is measured against the norm of
          // |x| |w|^T (+|b|), the scale the rounding error lives on.
          const std::vector<float> xs = cpu_vec<float>(x, static_cast<size_t>(m) * k);
          const std::vector<float> ws = cpu_vec<float>(w, static_cast<size_t>(n) * k);
          const std::vector<float> bs = cpu_vec<float>(b, static_cast<size_t>(n));
          const std::vector<float> yg = gpu_vec<float>(y, mn), yc = cpu_vec<float>(y, mn);
          double diff = 0, scale = 0;
          for (int i = 0; i < m; ++i) {
            for (int j = 0; j < n; ++j) {
              double s = with_bias ? std::fabs(bs[j]) : 0.0;
              for (int q = 0; q < k; ++q) s += std::fabs(xs[i * k + q]) * std::fabs(ws[j * k + q]);
              const double d = static_cast<double>(yg[i * n + j]) - yc[i * n + j];
              ASSERT_TRUE(std::isfinite(d)) << what;
              diff += d * d;
              scale += s * s;
            }
          }
          EXPECT_LE(std::sqrt(diff / scale), kFp32Bound) << what;
          bufs_.clear();
        }
      }
    }
  }
}

// bf16 weights: the GPU rounds x to bf16. Against the CPU on the same rounded x: fp32
// reordering only; against the CPU on fp32 x: the rounding of x (2^-9 relative at most).
TEST_F(CudaModelOps, LinearBf16WeightsMatchCpuOnRoundedX) {
  SKIP_WITHOUT_GPU();
  for (int m : {1, 7, 19, 127}) {
    for (int n : {1, 127, 1170}) {
      for (int k : {7, 64, 4096}) {
        const std::string what =
            "m " + std::to_string(m) + " n " + std::to_string(n) + " k " + std::to_string(k);
        const std::vector<float> xh = random_floats(static_cast<size_t>(m) * k, 11 + m);
        std::vector<float> xr(xh.size());
        for (size_t i = 0; i < xh.size(); ++i) xr[i] = bf16_to_float(float_to_bf16(xh[i]));
        const Pair x = both(xh);
        const Pair x_rounded = both(xr);
        const Pair w = both(to_bf16_host(random_floats(static_cast<size_t>(n) * k, 12 + n)));
        const Pair b = both(random_floats(static_cast<size_t>(n), 13 + k));
        const Pair y = zeros<float>(static_cast<size_t>(m) * n);
        const Pair y_rounded = zeros<float>(static_cast<size_t>(m) * n);
        cpu_ops_->linear(static_cast<const float*>(x.cpu), {w.cpu, WeightDtype::kBf16},
                         static_cast<const float*>(b.cpu), static_cast<float*>(y.cpu), m, n, k);
        cpu_ops_->linear(static_cast<const float*>(x_rounded.cpu), {w.cpu, WeightDtype::kBf16},
                         static_cast<const float*>(b.cpu), static_cast<float*>(y_rounded.cpu), m, n,
                         k);
        gpu_ops_->linear(static_cast<const float*>(x.gpu), {w.gpu, WeightDtype::kBf16},
                         static_cast<const float*>(b.gpu), static_cast<float*>(y.gpu), m, n, k);
        const size_t mn = static_cast<size_t>(m) * n;
        const std::vector<float> g = gpu_vec<float>(y, mn);
        EXPECT_LE(norm_err(g, cpu_vec<float>(y_rounded, mn), what + " vs rounded x"), kFp32Bound)
            << what;
        EXPECT_LE(norm_err(g, cpu_vec<float>(y, mn), what + " vs fp32 x"), 4e-3) << what;
        bufs_.clear();
      }
    }
  }
}

// linear_ordered on the CUDA-core kernel (runs that are not a multiple of 32, or fp32 weights):
// with bf16 weights every product is exact, so the GPU's fmaf and the twin's multiply-then-add
// round alike: the same bits, for odd m, n and run lengths, outliers (x1000) and empty batches.
// With fp32 weights the products round (the fma does not), so there only fp32 reordering is
// bounded.
TEST_F(CudaModelOps, LinearOrderedMatchesCpuBitForBit) {
  SKIP_WITHOUT_GPU();
  for (int m : {0, 1, 67, 130}) {
    for (int n : {1, 65, 300}) {
      for (int run : {13, 16, 40}) {
        for (int chunks : {1, 2, 8}) {
          const int k = run * chunks;
          const std::string what = "m " + std::to_string(m) + " n " + std::to_string(n) + " run " +
                                   std::to_string(run) + " chunks " + std::to_string(chunks);
          std::vector<float> xh = random_floats(static_cast<size_t>(m) * k, 31 + m + run);
          for (size_t i = 5; i < xh.size(); i += 97) xh[i] *= 1000.0f;
          const std::vector<float> wf = random_floats(static_cast<size_t>(n) * k, 32 + n);
          const Pair x = both(xh.empty() ? std::vector<float>(1) : xh);
          const Pair w16 = both(to_bf16_host(wf));
          const Pair w32 = both(wf);
          const Pair b = both(random_floats(static_cast<size_t>(n), 33 + k));
          const size_t mn = std::max<size_t>(1, static_cast<size_t>(m) * n);
          const Pair y16 = zeros<float>(mn), y32 = zeros<float>(mn);
          for (bool bf16 : {true, false}) {
            const Pair& w = bf16 ? w16 : w32;
            const Pair& y = bf16 ? y16 : y32;
            const WeightDtype dt = bf16 ? WeightDtype::kBf16 : WeightDtype::kF32;
            cpu_ops_->linear_ordered(static_cast<const float*>(x.cpu), {w.cpu, dt},
                                     static_cast<const float*>(b.cpu), static_cast<float*>(y.cpu),
                                     m, n, k, chunks);
            gpu_ops_->linear_ordered(static_cast<const float*>(x.gpu), {w.gpu, dt},
                                     static_cast<const float*>(b.gpu), static_cast<float*>(y.gpu),
                                     m, n, k, chunks);
          }
          const std::vector<float> g = gpu_vec<float>(y16, mn), c = cpu_vec<float>(y16, mn);
          size_t differ = 0;
          for (size_t i = 0; i < static_cast<size_t>(m) * n; ++i) {
            differ += std::memcmp(&g[i], &c[i], sizeof(float)) != 0;
          }
          EXPECT_EQ(differ, 0u) << what << " (bf16 weights)";
          if (m > 0) {
            EXPECT_LE(norm_err(gpu_vec<float>(y32, mn), cpu_vec<float>(y32, mn), what),
                      kFp32Bound * 10)
                << what << " (fp32 weights; 1000x outliers make the terms cancel)";
          }
          bufs_.clear();
        }
      }
    }
  }
}

// Runs that are a multiple of 32 on bf16 weights take the tensor-core kernel: each run adds in
// MMA steps of 16 products, which the tensor core sums in its own way, so against the CPU twin
// only the rounding bound of the order holds (per element, (run + levels + 2) u sum|x w|, doubled:
// both sides may sit at opposite ends of it). What tensor parallelism needs holds bit for bit:
// tp shards of k, each a tree over its runs, plus a rank-order tree give the whole's bits, and a
// block of rows and columns computed alone gives the same bits as inside the whole.
TEST_F(CudaModelOps, LinearOrderedTensorCoreShardsAndBlocksKeepTheirBits) {
  SKIP_WITHOUT_GPU();
  const double u = std::ldexp(1.0, -24);
  for (int m : {0, 1, 67, 300}) {
    for (int n : {1, 65, 300}) {
      for (int run : {32, 96}) {
        for (int chunks : {1, 2, 8}) {
          const int k = run * chunks;
          const std::string what = "m " + std::to_string(m) + " n " + std::to_string(n) + " run " +
                                   std::to_string(run) + " chunks " + std::to_string(chunks);
          std::vector<float> xh = random_floats(static_cast<size_t>(m) * k, 41 + m + run);
          for (size_t i = 5; i < xh.size(); i += 97) xh[i] *= 1000.0f;
          const std::vector<uint16_t> wh =
              to_bf16_host(random_floats(static_cast<size_t>(n) * k, 42 + n));
          const std::vector<float> bh = random_floats(static_cast<size_t>(n), 43 + k);
          const size_t mn = std::max<size_t>(1, static_cast<size_t>(m) * n);
          const Pair x = both(xh.empty() ? std::vector<float>(1) : xh), w = both(wh), b = both(bh),
                     y = zeros<float>(mn);
          cpu_ops_->linear_ordered(static_cast<const float*>(x.cpu), {w.cpu, WeightDtype::kBf16},
                                   static_cast<const float*>(b.cpu), static_cast<float*>(y.cpu), m,
                                   n, k, chunks);
          gpu_ops_->linear_ordered(static_cast<const float*>(x.gpu), {w.gpu, WeightDtype::kBf16},
                                   static_cast<const float*>(b.gpu), static_cast<float*>(y.gpu), m,
                                   n, k, chunks);
          const std::vector<float> g = gpu_vec<float>(y, mn), c = cpu_vec<float>(y, mn);
          int levels = 0;
          while ((1 << levels) < chunks) ++levels;
          int worse = 0;
          for (int i = 0; i < m; ++i) {
            for (int j = 0; j < n; ++j) {
              double mag = std::fabs(bh[j]);
              for (int t = 0; t < k; ++t) {
                mag += std::fabs(bf16_to_float(float_to_bf16(xh[i * k + t])) *
                                 static_cast<double>(bf16_to_float(wh[j * k + t])));
              }
              const double d = std::fabs(static_cast<double>(g[i * n + j]) - c[i * n + j]);
              worse += !(d <= 2.0 * (run + levels + 2) * u * mag);
            }
          }
          EXPECT_EQ(worse, 0) << what << ": elements outside the rounding bound of the order";
          if (m == 0) {
            bufs_.clear();
            continue;
          }
          // tp shards of k (rank r: columns [r k / tp, (r + 1) k / tp), chunks / tp runs).
          for (int tp = 2; tp <= chunks; tp *= 2) {
            const int kl = k / tp;
            std::vector<std::vector<float>> part(tp);
            for (int r = 0; r < tp; ++r) {
              std::vector<float> xr(static_cast<size_t>(m) * kl);
              std::vector<uint16_t> wr(static_cast<size_t>(n) * kl);
              for (int i = 0; i < m; ++i) {
                for (int t = 0; t < kl; ++t) xr[i * kl + t] = xh[i * k + r * kl + t];
              }
              for (int j = 0; j < n; ++j) {
                for (int t = 0; t < kl; ++t) wr[j * kl + t] = wh[j * k + r * kl + t];
              }
              const Pair xp = both(xr), wp = both(wr), yp = zeros<float>(mn);
              gpu_ops_->linear_ordered(static_cast<const float*>(xp.gpu),
                                       {wp.gpu, WeightDtype::kBf16}, nullptr,
                                       static_cast<float*>(yp.gpu), m, n, kl, chunks / tp);
              part[r] = gpu_vec<float>(yp, mn);
            }
            std::function<float(int, int, size_t)> tree = [&](int lo, int hi, size_t i) {
              if (hi - lo == 1) return part[lo][i];
              const int mid = lo + (hi - lo) / 2;
              return tree(lo, mid, i) + tree(mid, hi, i);
            };
            int differ = 0;
            for (int i = 0; i < m; ++i) {
              for (int j = 0; j < n; ++j) {
                const size_t at = static_cast<size_t>(i) * n + j;
                differ += tree(0, tp, at) + bh[j] != g[at];
              }
            }
            EXPECT_EQ(differ, 0) << what << " tp " << tp << ": shard trees differ from the whole";
          }
          // The last 3 rows and 7 columns alone.
          const int r0 = std::max(0, m - 3), c0 = std::max(0, n - 7), rows = m - r0, cols = n - c0;
          const Pair xs =
              both(std::vector<float>(xh.begin() + static_cast<size_t>(r0) * k, xh.end()));
          const Pair ws =
              both(std::vector<uint16_t>(wh.begin() + static_cast<size_t>(c0) * k, wh.end()));
          const Pair ys = zeros<float>(static_cast<size_t>(rows) * cols);
          gpu_ops_->linear_ordered(static_cast<const float*>(xs.gpu), {ws.gpu, WeightDtype::kBf16},
                                   static_cast<const float*>(b.gpu) + c0,
                                   static_cast<float*>(ys.gpu), rows, cols, k, chunks);
          const std::vector<float> block = gpu_vec<float>(ys, static_cast<size_t>(rows) * cols);
          int moved = 0;
          for (int i = 0; i < rows; ++i) {
            for (int j = 0; j < cols; ++j) {
              moved += block[i * cols + j] != g[static_cast<size_t>(r0 + i) * n + c0 + j];
            }
          }
          EXPECT_EQ(moved, 0) << what << ": a block computed alone changed bits";
          bufs_.clear();
        }
      }
    }
  }
}

TEST_F(CudaModelOps, RmsNormMatchesCpu) {
  SKIP_WITHOUT_GPU();
  for (int rows : {1, 7, 19}) {
    for (int dim : {1, 64, 1170, 4096}) {
      const std::string what = "rows " + std::to_string(rows) + " dim " + std::to_string(dim);
      const size_t n = static_cast<size_t>(rows) * dim;
      const Pair x = both(random_floats(n, 21 + dim, -8.0f, 8.0f));
      const Pair w = both(random_floats(static_cast<size_t>(dim), 22, 0.5f, 1.5f));
      const Pair y = zeros<float>(n);
      cpu_ops_->rms_norm(static_cast<const float*>(x.cpu), static_cast<const float*>(w.cpu),
                         static_cast<float*>(y.cpu), rows, dim, 1e-5f);
      gpu_ops_->rms_norm(static_cast<const float*>(x.gpu), static_cast<const float*>(w.gpu),
                         static_cast<float*>(y.gpu), rows, dim, 1e-5f);
      EXPECT_LE(norm_err(gpu_vec<float>(y, n), cpu_vec<float>(y, n), what), kFp32Bound) << what;
      bufs_.clear();
    }
  }
}

// RoPE on the K half of KV rows (row stride 2 * heads * D): the V half must stay untouched.
TEST_F(CudaModelOps, RopeMatchesCpuAndLeavesTheRestAlone) {
  SKIP_WITHOUT_GPU();
  for (int head_dim : {64, 128}) {
    for (int heads : {1, 8}) {
      for (int rows : {1, 19, 127}) {
        const std::string what = "D " + std::to_string(head_dim) + " heads " +
                                 std::to_string(heads) + " rows " + std::to_string(rows);
        const int64_t stride = 2ll * heads * head_dim;
        const size_t n = static_cast<size_t>(rows * stride);
        const std::vector<float> xh = random_floats(n, 31 + rows);
        std::vector<int32_t> pos(static_cast<size_t>(rows));
        std::mt19937 gen(32);
        for (auto& p : pos) p = static_cast<int32_t>(gen() % 40000);
        pos[0] = 0;
        const std::vector<float> inv_freq = llama3_inv_freq(head_dim);
        const Pair x = both(xh);
        const Pair p = both(pos);
        const Pair f = both(inv_freq);
        cpu_ops_->rope(static_cast<float*>(x.cpu), rows, stride, heads, head_dim,
                       static_cast<const int32_t*>(p.cpu), static_cast<const float*>(f.cpu));
        gpu_ops_->rope(static_cast<float*>(x.gpu), rows, stride, heads, head_dim,
                       static_cast<const int32_t*>(p.gpu), static_cast<const float*>(f.gpu));
        const std::vector<float> g = gpu_vec<float>(x, n), c = cpu_vec<float>(x, n);
        EXPECT_LE(norm_err(g, c, what), kFp32Bound) << what;
        int64_t touched = 0;
        for (int r = 0; r < rows; ++r) {
          for (int64_t j = static_cast<int64_t>(heads) * head_dim; j < stride; ++j) {
            const size_t i = static_cast<size_t>(r * stride + j);
            touched += g[i] != xh[i];
          }
        }
        EXPECT_EQ(touched, 0) << what << ": elements past the rotated heads changed";
        bufs_.clear();
      }
    }
  }
}

TEST_F(CudaModelOps, SiluMulMatchesCpu) {
  SKIP_WITHOUT_GPU();
  for (int rows : {1, 7, 19}) {
    for (int inter : {1, 127, 1024, 1170}) {  // 1024: the 4-wide kernel
      const std::string what = "rows " + std::to_string(rows) + " inter " + std::to_string(inter);
      const size_t n = static_cast<size_t>(rows) * inter;
      const Pair gu = both(random_floats(2 * n, 41 + inter, -12.0f, 12.0f));
      const Pair out = zeros<float>(n);
      cpu_ops_->silu_mul(static_cast<const float*>(gu.cpu), static_cast<float*>(out.cpu), rows,
                         inter);
      gpu_ops_->silu_mul(static_cast<const float*>(gu.gpu), static_cast<float*>(out.gpu), rows,
                         inter);
      EXPECT_LE(norm_err(gpu_vec<float>(out, n), cpu_vec<float>(out, n), what), kFp32Bound) << what;
      bufs_.clear();
    }
  }
}

// The bf16-input forms (ModelOps::bf16_gemm_inputs) move linear's rounding into the op that
// makes the input, so the model runner's GPU results keep their bits: on the GPU, rms_norm_bf16
// and silu_mul_bf16 are to_bf16 of rms_norm and silu_mul bit for bit, linear_bf16 on the
// rounded x is linear on x bit for bit (odd shapes, outliers, a bias, an empty batch), and the
// fused add_rms_norm_bf16 and rope_bf16 are their parts in a row; the CPU forms are the twins
// within the fp32 ops' bounds.
TEST_F(CudaModelOps, Bf16InputFormsKeepTheBitsOfTheFp32Ops) {
  SKIP_WITHOUT_GPU();
  auto bits_differ = [](const std::vector<uint16_t>& a, const std::vector<uint16_t>& b) {
    int64_t d = 0;
    for (size_t i = 0; i < a.size(); ++i) d += a[i] != b[i];
    return d;
  };
  for (int rows : {0, 1, 7, 19}) {
    for (int dim : {1, 64, 1170, 4096}) {
      const std::string what = "rows " + std::to_string(rows) + " dim " + std::to_string(dim);
      const size_t n = static_cast<size_t>(rows) * dim;
      std::vector<float> xh = random_floats(n, 51 + dim, -8.0f, 8.0f);
      if (n > 3) xh[n / 3] = 3000.0f;  // an outlier row
      const Pair x = both(xh);
      const Pair w = both(random_floats(static_cast<size_t>(dim), 52, 0.5f, 1.5f));
      const Pair y = zeros<float>(n);
      const Pair y16 = zeros<uint16_t>(n), y16_ref = zeros<uint16_t>(n);
      gpu_ops_->rms_norm(static_cast<const float*>(x.gpu), static_cast<const float*>(w.gpu),
                         static_cast<float*>(y.gpu), rows, dim, 1e-5f);
      gpu_ops_->to_bf16(static_cast<const float*>(y.gpu), static_cast<uint16_t*>(y16_ref.gpu), n);
      gpu_ops_->rms_norm_bf16(static_cast<const float*>(x.gpu), static_cast<const float*>(w.gpu),
                              static_cast<uint16_t*>(y16.gpu), rows, dim, 1e-5f);
      cpu_ops_->rms_norm_bf16(static_cast<const float*>(x.cpu), static_cast<const float*>(w.cpu),
                              static_cast<uint16_t*>(y16.cpu), rows, dim, 1e-5f);
      const std::vector<uint16_t> g = gpu_vec<uint16_t>(y16, n);
      EXPECT_EQ(bits_differ(g, gpu_vec<uint16_t>(y16_ref, n)), 0) << what;
      const std::vector<uint16_t> c = cpu_vec<uint16_t>(y16, n);
      std::vector<float> gf(n), cf(n);
      for (size_t i = 0; i < n; ++i) gf[i] = bf16_to_float(g[i]), cf[i] = bf16_to_float(c[i]);
      // Both round fp32 values that agree to kFp32Bound; a value at a rounding tie may go
      // either way: one bf16 step (2^-8 relative) at most there.
      EXPECT_LE(norm_err(gf, cf, what), 4e-3) << what;
      bufs_.clear();
    }
  }
  for (int rows : {0, 1, 7, 19}) {
    for (int inter : {1, 127, 1024, 1170}) {  // 1024: the 4-wide kernel
      const std::string what = "rows " + std::to_string(rows) + " inter " + std::to_string(inter);
      const size_t n = static_cast<size_t>(rows) * inter;
      const Pair gu = both(random_floats(2 * n, 53 + inter, -12.0f, 12.0f));
      const Pair out = zeros<float>(n);
      const Pair out16 = zeros<uint16_t>(n), out16_ref = zeros<uint16_t>(n);
      gpu_ops_->silu_mul(static_cast<const float*>(gu.gpu), static_cast<float*>(out.gpu), rows,
                         inter);
      gpu_ops_->to_bf16(static_cast<const float*>(out.gpu), static_cast<uint16_t*>(out16_ref.gpu),
                        n);
      gpu_ops_->silu_mul_bf16(static_cast<const float*>(gu.gpu), static_cast<uint16_t*>(out16.gpu),
                              rows, inter);
      cpu_ops_->silu_mul_bf16(static_cast<const float*>(gu.cpu), static_cast<uint16_t*>(out16.cpu),
                              rows, inter);
      const std::vector<uint16_t> g = gpu_vec<uint16_t>(out16, n);
      EXPECT_EQ(bits_differ(g, gpu_vec<uint16_t>(out16_ref, n)), 0) << what;
      const std::vector<uint16_t> c = cpu_vec<uint16_t>(out16, n);
      std::vector<float> gf(n), cf(n);
      for (size_t i = 0; i < n; ++i) gf[i] = bf16_to_float(g[i]), cf[i] = bf16_to_float(c[i]);
      EXPECT_LE(norm_err(gf, cf, what), 4e-3) << what;  // as above: a tie may round either way
      bufs_.clear();
    }
  }
  for (int m : {0, 1, 7, 33}) {
    for (int n : {1, 127, 1170}) {
      for (int k : {7, 64, 4096}) {
        const std::string what =
            "m " + std::to_string(m) + " n " + std::to_string(n) + " k " + std::to_string(k);
        std::vector<float> xh = random_floats(static_cast<size_t>(m) * k, 61 + m);
        if (!xh.empty()) xh[xh.size() / 2] = -5000.0f;
        std::vector<uint16_t> x16h(xh.size());
        for (size_t i = 0; i < xh.size(); ++i) x16h[i] = float_to_bf16(xh[i]);
        const Pair x = both(xh);
        const Pair x16 = both(x16h);
        const Pair w = both(to_bf16_host(random_floats(static_cast<size_t>(n) * k, 62 + n)));
        const Pair b = both(random_floats(static_cast<size_t>(n), 63 + k));
        const size_t mn = static_cast<size_t>(m) * n;
        const Pair y = zeros<float>(mn), y16in = zeros<float>(mn);
        gpu_ops_->linear(static_cast<const float*>(x.gpu), {w.gpu, WeightDtype::kBf16},
                         static_cast<const float*>(b.gpu), static_cast<float*>(y.gpu), m, n, k);
        gpu_ops_->linear_bf16(static_cast<const uint16_t*>(x16.gpu), {w.gpu, WeightDtype::kBf16},
                              static_cast<const float*>(b.gpu), static_cast<float*>(y16in.gpu), m,
                              n, k);
        cpu_ops_->linear_bf16(static_cast<const uint16_t*>(x16.cpu), {w.cpu, WeightDtype::kBf16},
                              static_cast<const float*>(b.cpu), static_cast<float*>(y16in.cpu), m,
                              n, k);
        const std::vector<float> g = gpu_vec<float>(y16in, mn), ref = gpu_vec<float>(y, mn);
        int64_t differ = 0;
        for (size_t i = 0; i < mn; ++i) differ += std::memcmp(&g[i], &ref[i], sizeof(float)) != 0;
        EXPECT_EQ(differ, 0) << what << ": linear_bf16(bf16(x)) is not linear(x)";
        EXPECT_LE(norm_err(g, cpu_vec<float>(y16in, mn), what), kFp32Bound) << what;
        bufs_.clear();
      }
    }
  }
  // add_rms_norm_bf16 = add, then rms_norm_bf16 (x holds the sum after both); rope_bf16 =
  // to_bf16 of rope on a copy, whole rows (the V half of a KV row copied), x unchanged.
  for (int rows : {0, 1, 7, 19}) {
    for (int dim : {64, 1170, 4096}) {
      const std::string what = "rows " + std::to_string(rows) + " dim " + std::to_string(dim);
      const size_t n = static_cast<size_t>(rows) * dim;
      const std::vector<float> xh = random_floats(n, 71 + dim, -8.0f, 8.0f);
      const Pair x = both(xh), x_ref = both(xh);
      const Pair a = both(random_floats(n, 72 + rows, -4.0f, 4.0f));
      const Pair w = both(random_floats(static_cast<size_t>(dim), 73, 0.5f, 1.5f));
      const Pair y16 = zeros<uint16_t>(n), y16_ref = zeros<uint16_t>(n);
      gpu_ops_->add(static_cast<float*>(x_ref.gpu), static_cast<const float*>(a.gpu), n);
      gpu_ops_->rms_norm_bf16(static_cast<const float*>(x_ref.gpu),
                              static_cast<const float*>(w.gpu), static_cast<uint16_t*>(y16_ref.gpu),
                              rows, dim, 1e-5f);
      gpu_ops_->add_rms_norm_bf16(static_cast<float*>(x.gpu), static_cast<const float*>(a.gpu),
                                  static_cast<const float*>(w.gpu), static_cast<uint16_t*>(y16.gpu),
                                  rows, dim, 1e-5f);
      cpu_ops_->add_rms_norm_bf16(static_cast<float*>(x.cpu), static_cast<const float*>(a.cpu),
                                  static_cast<const float*>(w.cpu), static_cast<uint16_t*>(y16.cpu),
                                  rows, dim, 1e-5f);
      EXPECT_EQ(bits_differ(gpu_vec<uint16_t>(y16, n), gpu_vec<uint16_t>(y16_ref, n)), 0) << what;
      const std::vector<float> gx = gpu_vec<float>(x, n), rx = gpu_vec<float>(x_ref, n);
      EXPECT_EQ(std::memcmp(gx.data(), rx.data(), n * sizeof(float)), 0) << what << ": the sum";
      EXPECT_EQ(std::memcmp(gx.data(), cpu_vec<float>(x, n).data(), n * sizeof(float)), 0) << what;
      bufs_.clear();
    }
  }
  // rope_bf16 reads its columns in place from wider rows: the Q part and the KV part (V copied)
  // of the QKV projection's rows [rows, (Hq + 2 Hkv) D] as the runner calls it, and a dense Q row.
  for (int head_dim : {64, 128}) {
    for (int rows : {0, 1, 19, 127}) {
      const int q_heads = 8, kv_heads = 2;
      const int64_t qd = static_cast<int64_t>(q_heads) * head_dim, kvd = 2ll * kv_heads * head_dim;
      struct Part {
        const char* name;
        int64_t x_stride, offset, width;
        int heads;
      };
      for (const Part& part : {Part{"dense Q rows", qd, 0, qd, q_heads},
                               Part{"Q of QKV rows", qd + kvd, 0, qd, q_heads},
                               Part{"KV of QKV rows", qd + kvd, qd, kvd, kv_heads}}) {
        const std::string what =
            "D " + std::to_string(head_dim) + " rows " + std::to_string(rows) + " " + part.name;
        const size_t nx = static_cast<size_t>(rows * part.x_stride);
        const size_t n = static_cast<size_t>(rows * part.width);
        const std::vector<float> xh = random_floats(nx, 81 + rows);
        // The reference: the part's columns gathered dense, rope in place, then to_bf16.
        std::vector<float> dense(n);
        for (int64_t r = 0; r < rows; ++r) {
          std::copy_n(xh.begin() + r * part.x_stride + part.offset, part.width,
                      dense.begin() + r * part.width);
        }
        std::vector<int32_t> pos(static_cast<size_t>(rows));
        for (int r = 0; r < rows; ++r) pos[static_cast<size_t>(r)] = (r * 7919) % 131072;
        const std::vector<float> inv_freq = llama3_inv_freq(head_dim);
        const Pair x = both(xh), x_ref = both(dense), p = both(pos), f = both(inv_freq);
        const Pair y16 = zeros<uint16_t>(n), y16_ref = zeros<uint16_t>(n);
        gpu_ops_->rope(static_cast<float*>(x_ref.gpu), rows, part.width, part.heads, head_dim,
                       static_cast<const int32_t*>(p.gpu), static_cast<const float*>(f.gpu));
        gpu_ops_->to_bf16(static_cast<const float*>(x_ref.gpu), static_cast<uint16_t*>(y16_ref.gpu),
                          n);
        gpu_ops_->rope_bf16(static_cast<const float*>(x.gpu) + part.offset, part.x_stride,
                            static_cast<uint16_t*>(y16.gpu), rows, part.width, part.heads, head_dim,
                            static_cast<const int32_t*>(p.gpu), static_cast<const float*>(f.gpu));
        cpu_ops_->rope_bf16(static_cast<const float*>(x.cpu) + part.offset, part.x_stride,
                            static_cast<uint16_t*>(y16.cpu), rows, part.width, part.heads, head_dim,
                            static_cast<const int32_t*>(p.cpu), static_cast<const float*>(f.cpu));
        const std::vector<uint16_t> g = gpu_vec<uint16_t>(y16, n);
        EXPECT_EQ(bits_differ(g, gpu_vec<uint16_t>(y16_ref, n)), 0) << what;
        EXPECT_EQ(gpu_vec<float>(x, nx), xh) << what << ": x changed";
        const std::vector<uint16_t> c = cpu_vec<uint16_t>(y16, n);
        std::vector<float> gf(n), cf(n);
        for (size_t i = 0; i < n; ++i) gf[i] = bf16_to_float(g[i]), cf[i] = bf16_to_float(c[i]);
        EXPECT_LE(norm_err(gf, cf, what), 4e-3) << what;  // a tie may round either way
        bufs_.clear();
      }
    }
  }
  // rope_qkv_bf16 (one kernel for the Q and the KV columns) = the two rope_bf16 calls, bit for
  // bit; GQA ratios 4 and 7, one KV head, a decode step's rows and odd prefill counts.
  for (int head_dim : {64, 128, 256}) {
    for (int rows : {0, 1, 19, 127}) {
      for (const auto& [q_heads, kv_heads] : {std::pair{8, 2}, std::pair{28, 4}, std::pair{3, 1}}) {
        const std::string what = "D " + std::to_string(head_dim) + " rows " + std::to_string(rows) +
                                 " Hq " + std::to_string(q_heads) + " Hkv " +
                                 std::to_string(kv_heads);
        const int64_t qd = static_cast<int64_t>(q_heads) * head_dim;
        const int64_t kvd = 2ll * kv_heads * head_dim;
        const size_t nq = static_cast<size_t>(rows * qd), nkv = static_cast<size_t>(rows * kvd);
        const std::vector<float> xh =
            random_floats(static_cast<size_t>(rows * (qd + kvd)), 83 + rows + q_heads);
        std::vector<int32_t> pos(static_cast<size_t>(rows));
        for (int r = 0; r < rows; ++r) pos[static_cast<size_t>(r)] = (r * 104729) % 131072;
        const std::vector<float> inv_freq = llama3_inv_freq(head_dim);
        const Pair x = both(xh), p = both(pos), f = both(inv_freq);
        const Pair q16 = zeros<uint16_t>(nq), kv16 = zeros<uint16_t>(nkv);
        const Pair q16_ref = zeros<uint16_t>(nq), kv16_ref = zeros<uint16_t>(nkv);
        const float* xg = static_cast<const float*>(x.gpu);
        const int32_t* pg = static_cast<const int32_t*>(p.gpu);
        const float* fg = static_cast<const float*>(f.gpu);
        gpu_ops_->rope_qkv_bf16(xg, rows, q_heads, kv_heads, head_dim,
                                static_cast<uint16_t*>(q16.gpu), static_cast<uint16_t*>(kv16.gpu),
                                pg, fg);
        gpu_ops_->rope_bf16(xg, qd + kvd, static_cast<uint16_t*>(q16_ref.gpu), rows, qd, q_heads,
                            head_dim, pg, fg);
        gpu_ops_->rope_bf16(xg + qd, qd + kvd, static_cast<uint16_t*>(kv16_ref.gpu), rows, kvd,
                            kv_heads, head_dim, pg, fg);
        EXPECT_EQ(bits_differ(gpu_vec<uint16_t>(q16, nq), gpu_vec<uint16_t>(q16_ref, nq)), 0)
            << what << ": Q";
        EXPECT_EQ(bits_differ(gpu_vec<uint16_t>(kv16, nkv), gpu_vec<uint16_t>(kv16_ref, nkv)), 0)
            << what << ": KV";
        EXPECT_EQ(gpu_vec<float>(x, xh.size()), xh) << what << ": qkv changed";
        bufs_.clear();
      }
    }
  }
  EXPECT_THROW(gpu_ops_->rope_qkv_bf16(nullptr, 1, 8, 2, 63, nullptr, nullptr, nullptr, nullptr),
               Error);
  EXPECT_THROW(gpu_ops_->rope_qkv_bf16(nullptr, 1, 8, 0, 64, nullptr, nullptr, nullptr, nullptr),
               Error);
  const Pair x16 = zeros<uint16_t>(16), y = zeros<float>(16), w32 = zeros<float>(16);
  EXPECT_THROW(
      gpu_ops_->linear_bf16(static_cast<const uint16_t*>(x16.gpu), {w32.gpu, WeightDtype::kF32},
                            nullptr, static_cast<float*>(y.gpu), 4, 4, 4),
      Error);
  EXPECT_THROW(
      cpu_ops_->linear_bf16(static_cast<const uint16_t*>(x16.cpu), {w32.cpu, WeightDtype::kF32},
                            nullptr, static_cast<float*>(y.cpu), 4, 4, 4),
      Error);
}

// Gathers copy: bit-identical, for fp32 and bf16 tables, repeated and out-of-order ids.
TEST_F(CudaModelOps, EmbeddingAndGatherRowsAreExact) {
  SKIP_WITHOUT_GPU();
  const int vocab = 1170;
  for (int dim : {1, 7, 512}) {
    for (int tokens : {1, 19, 127}) {
      const std::string what = "dim " + std::to_string(dim) + " tokens " + std::to_string(tokens);
      std::vector<int32_t> ids(static_cast<size_t>(tokens));
      std::mt19937 gen(51);
      for (auto& i : ids) i = static_cast<int32_t>(gen() % vocab);
      ids[0] = vocab - 1;
      const std::vector<float> table = random_floats(static_cast<size_t>(vocab) * dim, 52);
      const Pair id = both(ids);
      const Pair t32 = both(table);
      const Pair t16 = both(to_bf16_host(table));
      const size_t n = static_cast<size_t>(tokens) * dim;
      const Pair o32 = zeros<float>(n), o16 = zeros<float>(n), og = zeros<float>(n);
      cpu_ops_->embedding(static_cast<const int32_t*>(id.cpu), {t32.cpu, WeightDtype::kF32},
                          static_cast<float*>(o32.cpu), tokens, dim);
      gpu_ops_->embedding(static_cast<const int32_t*>(id.gpu), {t32.gpu, WeightDtype::kF32},
                          static_cast<float*>(o32.gpu), tokens, dim);
      cpu_ops_->embedding(static_cast<const int32_t*>(id.cpu), {t16.cpu, WeightDtype::kBf16},
                          static_cast<float*>(o16.cpu), tokens, dim);
      gpu_ops_->embedding(static_cast<const int32_t*>(id.gpu), {t16.gpu, WeightDtype::kBf16},
                          static_cast<float*>(o16.gpu), tokens, dim);
      cpu_ops_->gather_rows(static_cast<const float*>(t32.cpu), static_cast<const int32_t*>(id.cpu),
                            static_cast<float*>(og.cpu), tokens, dim);
      gpu_ops_->gather_rows(static_cast<const float*>(t32.gpu), static_cast<const int32_t*>(id.gpu),
                            static_cast<float*>(og.gpu), tokens, dim);
      EXPECT_EQ(gpu_vec<float>(o32, n), cpu_vec<float>(o32, n)) << what << " (fp32 table)";
      EXPECT_EQ(gpu_vec<float>(o16, n), cpu_vec<float>(o16, n)) << what << " (bf16 table)";
      EXPECT_EQ(gpu_vec<float>(og, n), cpu_vec<float>(og, n)) << what << " (gather_rows)";
      bufs_.clear();
    }
  }
}

// Conversions over every bf16 pattern and a sweep of float patterns (NaN, inf, ties, the
// largest finite values rounding to inf): the same bits. add: bit-identical.
TEST_F(CudaModelOps, ConversionsAndAddAreBitExact) {
  SKIP_WITHOUT_GPU();
  std::vector<uint16_t> all16(65536);
  for (size_t i = 0; i < all16.size(); ++i) all16[i] = static_cast<uint16_t>(i);
  std::vector<uint32_t> bits;
  for (uint64_t u = 0; u < (1ull << 32); u += 65521) bits.push_back(static_cast<uint32_t>(u));
  for (uint32_t b : {0x7f800000u, 0xff800000u, 0x7fc00000u, 0x7f800001u, 0xffffffffu, 0x7f7fffffu,
                     0x7f7f8000u, 0x3f808000u, 0x3f818000u, 0x00000001u}) {
    bits.push_back(b);
  }
  std::vector<float> fl(bits.size());
  std::memcpy(fl.data(), bits.data(), bits.size() * sizeof(float));

  const Pair a = both(all16);
  const Pair af = zeros<float>(all16.size());
  cpu_ops_->from_bf16(static_cast<const uint16_t*>(a.cpu), static_cast<float*>(af.cpu),
                      static_cast<int64_t>(all16.size()));
  gpu_ops_->from_bf16(static_cast<const uint16_t*>(a.gpu), static_cast<float*>(af.gpu),
                      static_cast<int64_t>(all16.size()));
  const std::vector<float> fg = gpu_vec<float>(af, all16.size()),
                           fc = cpu_vec<float>(af, all16.size());
  EXPECT_EQ(std::memcmp(fg.data(), fc.data(), fg.size() * sizeof(float)), 0) << "from_bf16";

  const Pair f = both(fl);
  const Pair h = zeros<uint16_t>(fl.size());
  cpu_ops_->to_bf16(static_cast<const float*>(f.cpu), static_cast<uint16_t*>(h.cpu),
                    static_cast<int64_t>(fl.size()));
  gpu_ops_->to_bf16(static_cast<const float*>(f.gpu), static_cast<uint16_t*>(h.gpu),
                    static_cast<int64_t>(fl.size()));
  const std::vector<uint16_t> hg = gpu_vec<uint16_t>(h, fl.size()),
                              hc = cpu_vec<uint16_t>(h, fl.size());
  size_t mismatches = 0;
  for (size_t i = 0; i < hg.size(); ++i) {
    if (hg[i] != hc[i] && mismatches++ < 5) {
      ADD_FAILURE() << "to_bf16 of bits 0x" << std::hex << bits[i] << ": gpu 0x" << hg[i]
                    << ", cpu 0x" << hc[i];
    }
  }
  EXPECT_EQ(mismatches, 0u);

  for (int n : {1, 7, 39275}) {
    const Pair y = both(random_floats(static_cast<size_t>(n), 61));
    const Pair x = both(random_floats(static_cast<size_t>(n), 62));
    cpu_ops_->add(static_cast<float*>(y.cpu), static_cast<const float*>(x.cpu), n);
    gpu_ops_->add(static_cast<float*>(y.gpu), static_cast<const float*>(x.gpu), n);
    EXPECT_EQ(gpu_vec<float>(y, static_cast<size_t>(n)), cpu_vec<float>(y, static_cast<size_t>(n)))
        << "add n " << n;
  }
}

// The first index of the largest value, as the CPU scans: ties, -inf rows, NaN at 0 (kept), NaN
// elsewhere (skipped), the maximum in the last element, a Llama-3-sized vocabulary.
TEST_F(CudaModelOps, ArgmaxMatchesCpuIncludingTiesAndNaN) {
  SKIP_WITHOUT_GPU();
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  // 1 and 7 and 128257: the scalar kernel; the others 4-wide (4100: a quad tail past the
  // four-in-flight loop).
  for (int vocab : {1, 7, 2048, 4100, 128256, 128257}) {
    const int rows = 8;
    std::vector<float> l = random_floats(static_cast<size_t>(rows) * vocab, 71 + vocab);
    auto row = [&](int r) { return l.data() + static_cast<size_t>(r) * vocab; };
    // Row 1: a tie of the maximum at two places; row 2: all -inf; row 3: NaN first;
    // row 4: NaN in the middle and +inf later; row 5: max in the last element; row 6: all NaN.
    row(1)[vocab / 3] = 5.0f;
    row(1)[vocab - 1] = 5.0f;
    for (int i = 0; i < vocab; ++i) row(2)[i] = -inf;
    row(3)[0] = nan;
    row(4)[vocab / 2] = nan;
    row(4)[vocab - 1] = inf;
    row(5)[vocab - 1] = 3.0f;
    for (int i = 0; i < vocab; ++i) row(6)[i] = nan;
    const Pair lp = both(l);
    const Pair out = zeros<int32_t>(static_cast<size_t>(rows));
    cpu_ops_->argmax(static_cast<const float*>(lp.cpu), static_cast<int32_t*>(out.cpu), rows,
                     vocab);
    gpu_ops_->argmax(static_cast<const float*>(lp.gpu), static_cast<int32_t*>(out.gpu), rows,
                     vocab);
    EXPECT_EQ(gpu_vec<int32_t>(out, rows), cpu_vec<int32_t>(out, rows)) << "vocab " << vocab;
    bufs_.clear();
  }
}

TEST_F(CudaModelOps, RefusesBadShapesAndOtherBackends) {
  SKIP_WITHOUT_GPU();
  EXPECT_THROW(make_cuda_model_ops(*cpu_, nullptr), Error);
  const Pair x = zeros<float>(64);
  EXPECT_THROW(gpu_ops_->rope(static_cast<float*>(x.gpu), 1, 64, 1, 63, nullptr, nullptr), Error);
  EXPECT_THROW(gpu_ops_->rope(static_cast<float*>(x.gpu), 1, 64, 2, 64, nullptr, nullptr), Error);
  // rope_bf16: a width past the row stride, an odd width, more heads than the width holds.
  const Pair y16 = zeros<uint16_t>(64);
  const float* xg = static_cast<const float*>(x.gpu);
  uint16_t* yg = static_cast<uint16_t*>(y16.gpu);
  EXPECT_THROW(gpu_ops_->rope_bf16(xg, 32, yg, 1, 64, 1, 32, nullptr, nullptr), Error);
  EXPECT_THROW(gpu_ops_->rope_bf16(xg, 64, yg, 1, 33, 1, 32, nullptr, nullptr), Error);
  EXPECT_THROW(gpu_ops_->rope_bf16(xg, 64, yg, 1, 32, 2, 32, nullptr, nullptr), Error);
  EXPECT_THROW(gpu_ops_->linear(static_cast<const float*>(x.gpu), {x.gpu, WeightDtype::kF32},
                                nullptr, static_cast<float*>(x.gpu), 1, 0, 8),
               Error);
}

}  // namespace
}  // namespace fp8kv
