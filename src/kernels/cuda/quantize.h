// Quantize-on-write with the device-side slot check (quantize.cu). launchers.h's
// launch_quantize_kv(p, stream) writes without a check (the benchmark's path); the backend uses
// the pair below so that an out-of-range slot writes nothing.
#pragma once

#include <cuda_runtime.h>

#include "fp8kv/backend.h"
#include "kernels/cuda/device_error.h"

namespace fp8kv::cuda {

// Resets *bad_token to UINT64_MAX, then lowers it to the first token whose slot is outside
// [0, num_slots). `bad_token`: one device word.
void launch_check_slots(const QuantizeKvParams& p, unsigned long long* bad_token,
                        cudaStream_t stream);
// Writes nothing (and observes nothing) when *bad_token != UINT64_MAX, and then records the
// token, its slot and the pool size in *error (DeviceErrorKind::kQuantizeSlot) unless an earlier
// error is still unread (so the host learns of it at its next synchronization, without a sync per
// call); null skips the check.
void launch_quantize_kv(const QuantizeKvParams& p, const unsigned long long* bad_token,
                        DeviceError* error, cudaStream_t stream);

}  // namespace fp8kv::cuda
