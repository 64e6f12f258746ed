// The device view of AttentionParams that every attention kernel reads (decode and both prefill
// kernels): the one place where the host struct is turned into kernel arguments. DecodeArgs
// (decode.cuh) and PrefillParams (prefill_common.cuh) extend it with what is their own.
#pragma once

#include <cmath>
#include <cstdint>

#include "fp8kv/backend.h"
#include "fp8kv/scheme.h"
#include "kernels/cuda/device_error.h"

namespace fp8kv::cuda {

struct AttentionArgs {
  const void* q = nullptr;           // [total_q, Hq, D] e4m3 (fp8-per-head) or bf16 (others)
  const float* q_scale = nullptr;    // [B, Hkv] fp8-per-head, else unused
  uint16_t* o = nullptr;             // [total_q, Hq, D] bf16
  const uint8_t* kv = nullptr;       // [num_slots + 1, 2 * Hkv, D] bf16, e4m3 or e5m2, as bytes
  const float* k_scale = nullptr;    // per-head [Hkv], per-tensor [1]; none for fp8-e5m2 / bf16
  const float* v_scale = nullptr;    // likewise
  const int32_t* seq_len = nullptr;  // [B]
  const int32_t* cu_seqlens_q = nullptr;  // [B + 1]
  const int32_t* req_index = nullptr;     // [B]
  const int32_t* req_to_token = nullptr;  // [max_requests, max_len]
  DeviceError* error = nullptr;           // where a request out of range is recorded (may be null)
  int max_requests = 0;                   // rows of req_to_token
  int max_len = 0;
  int num_q_heads = 0;         // Hq
  int num_kv_heads = 0;        // Hkv
  float softmax_scale = 0.0f;  // resolved: 1/sqrt(D) when the caller gave 0
};

inline AttentionArgs attention_args(const AttentionParams& p, DeviceError* error) {
  AttentionArgs a;
  a.q = fp8_q(p.cache.scheme) ? static_cast<const void*>(p.q_fp8) : static_cast<const void*>(p.q);
  a.q_scale = p.q_scale;
  a.o = p.o;
  a.kv = static_cast<const uint8_t*>(p.cache.data);
  a.k_scale = p.scales.k;
  a.v_scale = p.scales.v;
  a.seq_len = p.batch.seq_len;
  a.cu_seqlens_q = p.batch.cu_seqlens_q;
  a.req_index = p.batch.req_index;
  a.req_to_token = p.batch.req_to_token;
  a.error = error;
  a.max_requests = p.batch.max_requests;
  a.max_len = p.batch.max_len;
  a.num_q_heads = p.num_q_heads;
  a.num_kv_heads = p.cache.num_kv_heads;
  a.softmax_scale = p.softmax_scale > 0.0f ? p.softmax_scale
                                           : 1.0f / std::sqrt(static_cast<float>(p.cache.head_dim));
  return a;
}

}  // namespace fp8kv::cuda
