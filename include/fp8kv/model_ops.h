// The model's non-attention ops (GEMMs, norms, RoPE, ...): the interface the kernels implement
// (kernels/cpu/model_ops.cpp, kernels/cuda/model_ops.cu) and the runtime's ModelRunner calls.
#pragma once

#include <cstdint>
#include <memory>

#include "fp8kv/backend.h"
#include "fp8kv/export.h"

namespace fp8kv {

// Element type of the weight matrices (and the embedding table) in backend memory. Norm
// weights, biases and inv_freq are always fp32.
enum class WeightDtype { kF32, kBf16 };

// A weight matrix in backend memory, [rows, cols] row-major: fp32, or bf16 bit patterns.
struct WeightView {
  const void* data = nullptr;
  WeightDtype dtype = WeightDtype::kF32;
};

// The non-attention ops of the model, on fp32 activations in the backend's memory. The CPU
// version uses a BLAS for the GEMMs (OpenMP loops without one); the CUDA version
// (kernels/cuda/model_ops.cu; the CPU one is kernels/cpu/model_ops.cpp) uses cuBLAS and one small
// kernel per op on the backend's stream.
class FP8KV_API ModelOps {
 public:
  virtual ~ModelOps() = default;
  // y[m, n] = x[m, k] . w[n, k]^T (+ bias[n] when bias is not null): a torch Linear. With bf16
  // weights the CUDA version rounds x to bf16 and accumulates in fp32; the CPU version widens
  // the weights and runs the fp32 GEMM.
  virtual void linear(const float* x, WeightView w, const float* bias, float* y, int64_t m,
                      int64_t n, int64_t k) = 0;
  // linear with one fixed summation order, so that an output element has the same bits
  // whatever m, n, the device's launch and the rest of the GEMM: k is cut into `chunks` equal
  // runs (chunks a power of two dividing k), each run summed in fp32 from its first element to
  // its last (x rounded to bf16 first when w is bf16, as linear does, so every product is
  // exact), the run sums added as a balanced binary tree (left half + right half), then the
  // bias. On the GPU, runs that are a multiple of 32 on bf16 weights go through tensor cores:
  // the run adds in MMA steps of 16 products, steps in order, each step summed the tensor
  // core's way -- still the same bits for the same data anywhere, but not the CPU's bits (the
  // CPU twin agrees to the rounding bound then; other shapes agree bit for bit).
  // Tensor-parallel calibration uses it so that tp = N reproduces tp = 1 bit for bit: a
  // rank's row-parallel shard is a subtree of the tp = 1 tree (ModelRunner, exact_tp).
  virtual void linear_ordered(const float* x, WeightView w, const float* bias, float* y, int64_t m,
                              int64_t n, int64_t k, int chunks) = 0;
  // y[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * w; x, y [rows, dim], w [dim].
  virtual void rms_norm(const float* x, const float* w, float* y, int64_t rows, int dim,
                        float eps) = 0;

  // The bf16 GEMM inputs. Ops whose linear rounds x to bf16 (the CUDA ops: one more kernel per
  // GEMM) say so here, and the model runner then keeps the GEMMs' inputs in bf16 itself: the
  // op that makes an input writes it rounded (rms_norm_bf16, silu_mul_bf16, the attention's
  // bf16 output) and linear_bf16 takes it as it is. The same bits as linear on the fp32 values
  // (the rounding moved, not changed): no rounding kernel per GEMM, no widening of the attention
  // output, and the residual adds inside the next norm (add_rms_norm_bf16 below).
  virtual bool bf16_gemm_inputs() const { return false; }
  // linear on x16 [m, k] (bf16 bit patterns), bf16 weights only: y = x16 . w^T (+ bias), fp32
  // accumulate. The CPU version widens x16 and runs linear.
  virtual void linear_bf16(const uint16_t* x16, WeightView w, const float* bias, float* y,
                           int64_t m, int64_t n, int64_t k) = 0;
  // rms_norm with y rounded to bf16 (round to nearest even): y16 [rows, dim].
  virtual void rms_norm_bf16(const float* x, const float* w, uint16_t* y16, int64_t rows, int dim,
                             float eps) = 0;
  // silu_mul with out rounded to bf16: out16 [rows, inter].
  virtual void silu_mul_bf16(const float* gate_up, uint16_t* out16, int64_t rows,
                             int64_t inter) = 0;
  // The residual add and the next norm in one: x += a, then rms_norm_bf16 of the sum. x, a
  // [rows, dim].
  virtual void add_rms_norm_bf16(float* x, const float* a, const float* w, uint16_t* y16,
                                 int64_t rows, int dim, float eps) = 0;
  // y16 = bf16 of x with rope applied (x itself unchanged), `width` columns of each row: the
  // heads rope rotates, then the rest of the width as it is (the V half of a KV row). x [rows,
  // x_stride] with x_stride >= width: the Q or the KV columns of the QKV projection's rows are
  // read in place; y16 [rows, width], dense. width even.
  virtual void rope_bf16(const float* x, int64_t x_stride, uint16_t* y16, int64_t rows,
                         int64_t width, int heads, int head_dim, const int32_t* positions,
                         const float* inv_freq) = 0;
  // The QKV projection's rows qkv [rows, (q_heads + 2 kv_heads) * head_dim] (Q, then K, then V)
  // into the dense bf16 Q rows q16 [rows, q_heads * head_dim] and KV rows kv16 [rows, 2 kv_heads *
  // head_dim]: rope_bf16 of the Q columns and of the KV columns (K rotated, V copied), the same
  // bits. The CUDA ops do both in one kernel; this default makes the two calls.
  virtual void rope_qkv_bf16(const float* qkv, int64_t rows, int q_heads, int kv_heads,
                             int head_dim, uint16_t* q16, uint16_t* kv16, const int32_t* positions,
                             const float* inv_freq) {
    const int64_t qd = static_cast<int64_t>(q_heads) * head_dim;
    const int64_t kvd = 2 * static_cast<int64_t>(kv_heads) * head_dim;
    rope_bf16(qkv, qd + kvd, q16, rows, qd, q_heads, head_dim, positions, inv_freq);
    rope_bf16(qkv + qd, qd + kvd, kv16, rows, kvd, kv_heads, head_dim, positions, inv_freq);
  }
  // In-place RoPE, Hugging Face rotate_half convention: in each head, element i pairs with
  // i + D/2 and both rotate by positions[r] * inv_freq[i]. x [rows, row_stride]; the heads
  // rotated are x[r, h * D .. (h + 1) * D) for h < heads. inv_freq [D / 2].
  virtual void rope(float* x, int64_t rows, int64_t row_stride, int heads, int head_dim,
                    const int32_t* positions, const float* inv_freq) = 0;
  // out[r, i] = silu(gate_up[r, i]) * gate_up[r, inter + i]; gate_up [rows, 2 * inter],
  // out [rows, inter].
  virtual void silu_mul(const float* gate_up, float* out, int64_t rows, int64_t inter) = 0;
  // out[t, :] = table[ids[t], :]; ids [tokens], table [vocab, dim] (fp32 or bf16),
  // out [tokens, dim].
  virtual void embedding(const int32_t* ids, WeightView table, float* out, int64_t tokens,
                         int64_t dim) = 0;
  // out[i, :] = src[rows[i], :]; src [*, dim], rows [n], out [n, dim].
  virtual void gather_rows(const float* src, const int32_t* rows, float* out, int64_t n,
                           int64_t dim) = 0;
  // y[i] += x[i], n elements.
  virtual void add(float* y, const float* x, int64_t n) = 0;
  virtual void to_bf16(const float* x, uint16_t* y, int64_t n) = 0;
  virtual void from_bf16(const uint16_t* x, float* y, int64_t n) = 0;
  // out[r] = the first index of the largest logits[r, :]; logits [rows, vocab].
  virtual void argmax(const float* logits, int32_t* out, int64_t rows, int64_t vocab) = 0;

  // Recording into a StepGraph (Backend::begin_capture). prepare_capture(): called once before
  // the first recording, so that the ops' calls can be recorded: the CUDA ops give cuBLAS a
  // workspace of their own (cuBLAS allocates none inside a capture), used by every later call,
  // recorded or not. memory_epoch(): counts the frees of memory the ops' recorded work may
  // point into (their bf16 copy of x regrown), as Backend::memory_epoch.
  virtual void prepare_capture() {}
  virtual uint64_t memory_epoch() const { return 0; }
};

FP8KV_API std::unique_ptr<ModelOps> make_cpu_model_ops();
// The CUDA ModelOps (only when built with CUDA; a CPU-only build throws Error). `backend` must
// be a CUDA backend and `stream` its stream (a cudaStream_t; null: the default stream, which is
// what make_cuda_backend's default uses): the ops queue their work behind the backend's.
FP8KV_API std::unique_ptr<ModelOps> make_cuda_model_ops(Backend& backend, void* stream = nullptr);

}  // namespace fp8kv
