// Launch of the fixed-order GEMMs (kernels/cuda/ordered_linear.cu) for the CUDA ModelOps.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "fp8kv/model_ops.h"

namespace fp8kv::cuda {

// Whether linear_ordered on these weights runs on tensor cores, which read x rounded to bf16:
// bf16 weights and runs (k / chunks) that are a multiple of 32.
bool linear_ordered_wants_bf16_x(WeightView w, int64_t k, int chunks);
// y[m, n] = x[m, k] . w[n, k]^T (+ bias) in linear_ordered's order, queued on `stream`. x16 is
// x rounded to bf16 ([m, k]) when linear_ordered_wants_bf16_x, null otherwise. The shape is
// checked already (check_ordered_shape); throws Error when m needs more than 65535 row tiles.
void launch_linear_ordered(const float* x, const uint16_t* x16, WeightView w, const float* bias,
                           float* y, int64_t m, int64_t n, int64_t k, int chunks,
                           cudaStream_t stream);

}  // namespace fp8kv::cuda
