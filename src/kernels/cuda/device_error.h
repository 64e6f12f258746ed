// Refusals that only the device can see (the index arrays live in device memory, and reading
// them on the host would synchronize every call): a kernel that finds a bad index reads and
// writes nothing for it and records the first such refusal in one DeviceError word block of the
// CUDA backend, which reads it at its next synchronization (synchronize(), download()) and throws
// Error with the message below. Shared by the kernels (nvcc) and the backend (host C++).
#pragma once

#include <climits>
#include <cstdint>

namespace fp8kv::cuda {

enum class DeviceErrorKind : unsigned long long {
  kQuantizeSlot = 1,    // quantize_kv: slots[index] = value out of [0, bound = num_slots)
  kPrefillRequest = 2,  // prefill_attention: b_req_idx[index] = value out of [0, max_requests)
  kDecodeRequest = 3,   // decode_attention: likewise
  kDecodeOrder = 4,     // decode_attention: decode_order[index] = value out of [0, num_requests)
};

// The first refusal since the host last read it. Device memory, all 0xff bytes when empty.
struct DeviceError {
  unsigned long long index;  // the token (quantize_kv) or request (attention); ULLONG_MAX: none
  unsigned long long value;  // the bad slot / b_req_idx, as int64 bits
  unsigned long long bound;  // num_slots / max_requests of that call
  unsigned long long kind;   // DeviceErrorKind
};

#ifdef __CUDACC__
// Records a refusal unless an earlier one is still unread (null: the caller has no error block,
// e.g. the benchmark: the refusal then only skips the work).
__device__ __forceinline__ void record_device_error(DeviceError* e, DeviceErrorKind kind,
                                                    unsigned long long index, long long value,
                                                    long long bound) {
  if (e == nullptr) return;
  if (atomicCAS(&e->index, ULLONG_MAX, index) == ULLONG_MAX) {
    e->value = static_cast<unsigned long long>(value);
    e->bound = static_cast<unsigned long long>(bound);
    e->kind = static_cast<unsigned long long>(kind);
  }
}

// Row of req_to_token of request b, or null when b_req_idx[b] is outside [0, max_requests): then
// nothing of that request may be read, and the refusal is recorded as kKind. `Args`: the kernel's
// device arguments (DecodeArgs, PrefillParams) with req_index, req_to_token, max_requests, max_len
// and error.
template <DeviceErrorKind kKind, class Args>
__device__ __forceinline__ const int32_t* request_row(const Args& a, int b) {
  const int32_t req = a.req_index[b];
  if (req < 0 || req >= a.max_requests) {
    if (threadIdx.x == 0) record_device_error(a.error, kKind, b, req, a.max_requests);
    return nullptr;
  }
  return a.req_to_token + static_cast<int64_t>(req) * a.max_len;
}
#endif

}  // namespace fp8kv::cuda
