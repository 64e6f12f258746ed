// The CPU ops with x rounded to bf16 before each GEMM: the CUDA ops' arithmetic, on the CPU
// (shared by the runner's CPU and GPU tests). bf16_inputs: whether they ask the runner for bf16
// GEMM inputs (ModelOps::bf16_gemm_inputs), as the CUDA ops do; the arithmetic is the same.
#pragma once

#include <memory>
#include <vector>

#include "fp8kv/fp8.h"
#include "fp8kv/model_ops.h"

namespace fp8kv {

class Bf16ActivationCpuOps final : public ModelOps {
 public:
  explicit Bf16ActivationCpuOps(bool bf16_inputs = false)
      : cpu_(make_cpu_model_ops()), bf16_inputs_(bf16_inputs) {}
  bool bf16_gemm_inputs() const override { return bf16_inputs_; }
  void linear(const float* x, WeightView w, const float* bias, float* y, int64_t m, int64_t n,
              int64_t k) override {
    xr_.resize(static_cast<size_t>(m * k));
    for (size_t i = 0; i < xr_.size(); ++i) xr_[i] = bf16_to_float(float_to_bf16(x[i]));
    cpu_->linear(xr_.data(), w, bias, y, m, n, k);
  }
  void linear_ordered(const float* x, WeightView w, const float* bias, float* y, int64_t m,
                      int64_t n, int64_t k, int chunks) override {
    cpu_->linear_ordered(x, w, bias, y, m, n, k, chunks);  // rounds x itself for bf16 weights
  }
  void rms_norm(const float* x, const float* w, float* y, int64_t rows, int dim,
                float eps) override {
    cpu_->rms_norm(x, w, y, rows, dim, eps);
  }
  void linear_bf16(const uint16_t* x16, WeightView w, const float* bias, float* y, int64_t m,
                   int64_t n, int64_t k) override {
    ++bf16_linears;
    cpu_->linear_bf16(x16, w, bias, y, m, n, k);  // x16 is bf16 already: linear's rounding
  }
  int64_t bf16_linears = 0;  // linear_bf16 calls
  void rms_norm_bf16(const float* x, const float* w, uint16_t* y16, int64_t rows, int dim,
                     float eps) override {
    cpu_->rms_norm_bf16(x, w, y16, rows, dim, eps);
  }
  void silu_mul_bf16(const float* gate_up, uint16_t* out16, int64_t rows, int64_t inter) override {
    cpu_->silu_mul_bf16(gate_up, out16, rows, inter);
  }
  void add_rms_norm_bf16(float* x, const float* a, const float* w, uint16_t* y16, int64_t rows,
                         int dim, float eps) override {
    cpu_->add_rms_norm_bf16(x, a, w, y16, rows, dim, eps);
  }
  void rope_bf16(const float* x, int64_t x_stride, uint16_t* y16, int64_t rows, int64_t width,
                 int heads, int head_dim, const int32_t* positions,
                 const float* inv_freq) override {
    cpu_->rope_bf16(x, x_stride, y16, rows, width, heads, head_dim, positions, inv_freq);
  }
  void rope(float* x, int64_t rows, int64_t row_stride, int heads, int head_dim,
            const int32_t* positions, const float* inv_freq) override {
    cpu_->rope(x, rows, row_stride, heads, head_dim, positions, inv_freq);
  }
  void silu_mul(const float* gate_up, float* out, int64_t rows, int64_t inter) override {
    cpu_->silu_mul(gate_up, out, rows, inter);
  }
  void embedding(const int32_t* ids, WeightView table, float* out, int64_t tokens,
                 int64_t dim) override {
    cpu_->embedding(ids, table, out, tokens, dim);
  }
  void gather_rows(const float* src, const int32_t* rows, float* out, int64_t n,
                   int64_t dim) override {
    cpu_->gather_rows(src, rows, out, n, dim);
  }
  void add(float* y, const float* x, int64_t n) override { cpu_->add(y, x, n); }
  void to_bf16(const float* x, uint16_t* y, int64_t n) override { cpu_->to_bf16(x, y, n); }
  void from_bf16(const uint16_t* x, float* y, int64_t n) override { cpu_->from_bf16(x, y, n); }
  void argmax(const float* logits, int32_t* out, int64_t rows, int64_t vocab) override {
    cpu_->argmax(logits, out, rows, vocab);
  }

 private:
  std::unique_ptr<ModelOps> cpu_;
  bool bf16_inputs_;
  std::vector<float> xr_;
};

}  // namespace fp8kv
