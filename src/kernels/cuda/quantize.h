// Quantize-on-write with the device-side slot check (quantize.cu). launchers.h's
// launch_quantize_kv(p, stream) writes without a check (the benchmark's path); the backend uses
// the pair below so that an out-of-range slot writes nothing.
#pragma once

#include <cuda_runtime.h>

#include "fp8kv/backend.h"

namespace fp8kv::cuda {

// Resets *bad_token to UINT64_MAX, then lowers it to the first token whose slot is outside
// [0, num_slots). `bad_token`: one device word.
void launch_check_slots(const QuantizeKvParams& p, unsigned long long* bad_token,
                        cudaStream_t stream);
// Writes nothing (and observes nothing) when *bad_token != UINT64_MAX; null skips the check.
void launch_quantize_kv(const QuantizeKvParams& p, const unsigned long long* bad_token,
                        cudaStream_t stream);

}  // namespace fp8kv::cuda
