// ModelOps::linear_ordered on the CPU: the sum it promises (within the rounding bound of its
// order, against float64), the property tensor-parallel calibration relies on (tp row shards,
// each a tree over its runs, plus a rank-order tree of the shards give the whole's bits), the
// same bits for any rows and columns, and its refusals. The GPU kernel is compared with this
// twin bit for bit in tests/cuda/model_ops_test.cpp.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "fp8kv/error.h"
#include "fp8kv/fp8.h"
#include "fp8kv/model_ops.h"

namespace fp8kv {
namespace {

// Normal values with a few outliers (x1000), as activations with outlier channels have.
std::vector<float> values(size_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = d(gen) * (i % 97 == 5 ? 1000.0f : 1.0f);
  return v;
}

std::vector<uint16_t> bf16s(const std::vector<float>& v) {
  std::vector<uint16_t> b(v.size());
  for (size_t i = 0; i < v.size(); ++i) b[i] = float_to_bf16(v[i]);
  return b;
}

// Columns [k0, k0 + kn) of a row-major [rows, k] matrix, contiguous.
template <typename T>
std::vector<T> columns(const std::vector<T>& a, int64_t rows, int64_t k, int64_t k0, int64_t kn) {
  std::vector<T> out(static_cast<size_t>(rows * kn));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < kn; ++j) out[r * kn + j] = a[r * k + k0 + j];
  }
  return out;
}

struct Weights {
  std::vector<float> f32;
  std::vector<uint16_t> b16;
  WeightView view(bool bf16) const {
    return bf16 ? WeightView{b16.data(), WeightDtype::kBf16}
                : WeightView{f32.data(), WeightDtype::kF32};
  }
};

Weights weights(std::vector<float> w) {
  Weights out;
  out.b16 = bf16s(w);
  out.f32 = std::move(w);
  return out;
}

TEST(OrderedLinear, WithinTheRoundingBoundOfItsOrder) {
  auto ops = make_cpu_model_ops();
  const int64_t m = 5, n = 33, k = 8 * 40;
  const std::vector<float> x = values(m * k, 1), bias = values(n, 3);
  const Weights w = weights(values(n * k, 2));
  for (bool bf16 : {false, true}) {
    for (int chunks : {1, 2, 4, 8}) {
      std::vector<float> y(m * n);
      ops->linear_ordered(x.data(), w.view(bf16), bias.data(), y.data(), m, n, k, chunks);
      const int64_t run = k / chunks;
      int levels = 0;
      while ((1 << levels) < chunks) ++levels;
      // A run of r fp32 additions and `levels` tree additions and the bias: at most
      // (r + levels + 1) u sum |terms| from the exact sum (u = 2^-24; the products are exact
      // for bf16 weights on rounded x, one more u each for fp32 weights).
      const double u = std::ldexp(1.0, -24);
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t j = 0; j < n; ++j) {
          double exact = bias[j], mag = std::fabs(bias[j]);
          for (int64_t t = 0; t < k; ++t) {
            const double xv = bf16 ? bf16_to_float(float_to_bf16(x[i * k + t])) : x[i * k + t];
            const double wv = bf16 ? bf16_to_float(w.b16[j * k + t]) : w.f32[j * k + t];
            exact += xv * wv;
            mag += std::fabs(xv * wv);
          }
          const double bound = (run + levels + 2) * u * mag;
          EXPECT_LE(std::fabs(y[i * n + j] - exact), bound)
              << (bf16 ? "bf16" : "f32") << " chunks " << chunks << " at " << i << "," << j;
        }
      }
    }
  }
}

// The tp shards of a row-parallel linear (rank r: columns [r k/tp, (r+1) k/tp) of x and w,
// chunks/tp runs) summed as a rank-order tree give the whole's bits, for tp 2, 4 and 8.
TEST(OrderedLinear, RowShardsAndARankTreeGiveTheWholeBitForBit) {
  auto ops = make_cpu_model_ops();
  const int64_t m = 7, n = 19, run = 24, chunks = 8, k = run * chunks;
  const std::vector<float> x = values(m * k, 4);
  const Weights w = weights(values(n * k, 5));
  for (bool bf16 : {false, true}) {
    std::vector<float> whole(m * n);
    ops->linear_ordered(x.data(), w.view(bf16), nullptr, whole.data(), m, n, k, chunks);
    for (int tp : {2, 4, 8}) {
      const int64_t kl = k / tp;
      std::vector<std::vector<float>> part(tp, std::vector<float>(m * n));
      for (int r = 0; r < tp; ++r) {
        const std::vector<float> xr = columns(x, m, k, r * kl, kl);
        const Weights wr{columns(w.f32, n, k, r * kl, kl), columns(w.b16, n, k, r * kl, kl)};
        ops->linear_ordered(xr.data(), wr.view(bf16), nullptr, part[r].data(), m, n, kl,
                            static_cast<int>(chunks / tp));
      }
      const std::function<float(int, int, size_t)> tree = [&](int lo, int hi, size_t i) {
        if (hi - lo == 1) return part[lo][i];
        const int mid = lo + (hi - lo) / 2;
        return tree(lo, mid, i) + tree(mid, hi, i);
      };
      size_t differ = 0;
      for (size_t i = 0; i < whole.size(); ++i) differ += tree(0, tp, i) != whole[i];
      EXPECT_EQ(differ, 0u) << (bf16 ? "bf16" : "f32") << " tp " << tp;
    }
  }
}

// An output element's bits do not depend on the other rows and columns of the call (the
// column-parallel shards compute a subset of the columns).
TEST(OrderedLinear, SameBitsForAnySubsetOfRowsAndColumns) {
  auto ops = make_cpu_model_ops();
  const int64_t m = 9, n = 70, k = 4 * 33;
  const std::vector<float> x = values(m * k, 6), bias = values(n, 8);
  const Weights w = weights(values(n * k, 7));
  for (bool bf16 : {false, true}) {
    std::vector<float> whole(m * n);
    ops->linear_ordered(x.data(), w.view(bf16), bias.data(), whole.data(), m, n, k, 4);
    const int64_t r0 = 3, rows = 2, c0 = 35, cols = 35;  // a block of the output
    const std::vector<float> xs(x.begin() + r0 * k, x.begin() + (r0 + rows) * k);
    const Weights ws{columns(w.f32, 1, n * k, c0 * k, cols * k),
                     columns(w.b16, 1, n * k, c0 * k, cols * k)};  // rows c0 .. c0 + cols
    std::vector<float> y(rows * cols);
    ops->linear_ordered(xs.data(), ws.view(bf16), bias.data() + c0, y.data(), rows, cols, k, 4);
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t j = 0; j < cols; ++j) {
        EXPECT_EQ(y[i * cols + j], whole[(r0 + i) * n + c0 + j]) << i << "," << j;
      }
    }
  }
}

TEST(OrderedLinear, RefusesChunksItCannotOrder) {
  auto ops = make_cpu_model_ops();
  std::vector<float> x(2 * 24), w(3 * 24), y(6);
  const WeightView wv{w.data(), WeightDtype::kF32};
  for (int chunks : {0, 3, 16}) {
    try {
      ops->linear_ordered(x.data(), wv, nullptr, y.data(), 2, 3, 24, chunks);
      ADD_FAILURE() << "chunks " << chunks << " accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("chunks " + std::to_string(chunks)), std::string::npos)
          << e.what();
    }
  }
  // 8 runs do not divide k = 20.
  EXPECT_THROW(ops->linear_ordered(x.data(), wv, nullptr, y.data(), 2, 3, 20, 8), Error);
  EXPECT_THROW(ops->linear_ordered(x.data(), wv, nullptr, y.data(), 2, 0, 24, 1), Error);
  ops->linear_ordered(x.data(), wv, nullptr, y.data(), 0, 3, 24, 2);  // no rows: nothing to do
}

}  // namespace
}  // namespace fp8kv
