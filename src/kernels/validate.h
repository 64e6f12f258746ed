// Argument validation shared by the CPU and CUDA backends.
//
// Two levels:
//  - validate_* (params): only host-visible facts of the params structs (pointers present,
//    counts, head counts, head_dim, scheme-specific pointers, the batch's host-side totals).
//    Both backends call these before any work is launched.
//  - check_* (array contents): facts that need the arrays themselves (slots in range, seq_len
//    >= q_len, cu_seqlens monotone). The CPU backend calls them on its own memory; the CUDA
//    backend can call them on host copies (a debug mode) since they take plain host pointers.
// Every check throws fp8kv::Error whose message starts with the kernel's name and names the bad
// argument and its value. All checks run before anything is written.
#pragma once

#include <cstdint>

#include "fp8kv/backend.h"

namespace fp8kv {

enum class AttentionPhase {
  kPrefill,  // any q_len (>= 0) per request
  kDecode,   // exactly one new token per request
};

const char* attention_phase_name(AttentionPhase phase);  // "prefill_attention" / "decode_attention"

// True for the head dims the kernels are built for: 64, 128, 256.
bool is_supported_head_dim(int head_dim);

// ---- host-visible facts of the params ------------------------------------------------------
void validate_quantize_kv(const QuantizeKvParams& p);
void validate_quantize_q(const QuantizeQParams& p);
void validate_attention(const AttentionParams& p, AttentionPhase phase);

// ---- array contents (host pointers) --------------------------------------------------------
// slots: [num_tokens], each in [0, num_slots).
void check_slots(const char* kernel, const int32_t* slots, int64_t num_tokens, int64_t num_slots);
// cu_seqlens_q: [num_requests + 1], starts at 0, non-decreasing, ends at total_q.
void check_cu_seqlens(const char* kernel, const int32_t* cu_seqlens_q, int num_requests,
                      int64_t total_q);
// The whole batch: cu_seqlens_q, q_len <= max_q_len (== 1 for decode), q_len <= seq_len <=
// max_seq_len <= max_len, req_index >= 0, every slot the batch reads in [0, num_slots), and
// decode_order (when given) a permutation of the requests.
void check_batch(const AttentionBatch& batch, int64_t num_slots, AttentionPhase phase);
// Scales: [count] finite and > 0 (real = fp8 * scale).
void check_scales(const char* kernel, const char* what, const float* scales, int count);

}  // namespace fp8kv
