// Which decode kernel runs: a host-only switch (no CUDA headers), so the tests and the benchmark
// can run every kernel on the same problem. STYLE: the simple kernel stays selectable beside the
// fast one, so a regression can be bisected and the benchmark shows what each step bought.
#pragma once

namespace fp8kv::cuda {

enum DecodeVariant : int {
  // The fastest validated kernel of each scheme: the tensor-core kernel (decode_mma_kernel.cuh)
  // for the FP8 schemes, the CUDA-core kernel (decode_kernel.cuh) for bf16.
  kDecodeDefault = 0,
  kDecodeSimtAltOccupancy = 1,  // the CUDA-core kernel, 4-head instances at the other occupancy
  kDecodeSimt = 2,              // the CUDA-core kernel at its default occupancy
  kDecodeMma = 3,               // the tensor-core kernel wherever it exists (FP8), else kDecodeSimt
};

// Whether kDecodeDefault picks the tensor-core kernel for the FP8 schemes. One switch to flip
// should the tensor-core kernel ever fail validation on a device.
constexpr bool kDecodeMmaIsDefault = true;

void set_decode_variant(int variant);
int decode_variant();

}  // namespace fp8kv::cuda
