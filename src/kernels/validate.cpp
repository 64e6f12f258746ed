#include "kernels/validate.h"

#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "fp8kv/error.h"

namespace fp8kv {
namespace {

// Throws Error("<kernel>: <parts...>").
template <typename... Parts>
[[noreturn]] void fail(const char* kernel, const Parts&... parts) {
  std::ostringstream os;
  os << kernel << ": ";
  (os << ... << parts);
  throw Error(os.str());
}

void require_pointer(const char* kernel, const void* ptr, const char* name) {
  if (ptr == nullptr) fail(kernel, name, " is null");
}

// The CUDA kernels copy Q, K/V and the output in 16-byte pieces: a tensor must start on a
// 16-byte boundary (every allocator's tensors do; a view at an odd element offset does not).
void require_aligned(const char* kernel, const void* ptr, const char* name) {
  const auto address = reinterpret_cast<std::uintptr_t>(ptr);
  if (address % 16 != 0) {
    fail(kernel, name, " is not 16-byte aligned (address 0x", std::hex, address, std::dec,
         "): pass a tensor that starts on a 16-byte boundary");
  }
}

void validate_head_dim(const char* kernel, int head_dim) {
  if (!is_supported_head_dim(head_dim)) {
    fail(kernel, "head_dim ", head_dim, " not built: supported 64, 128, 256");
  }
}

void validate_cache(const char* kernel, const KvCacheLayer& cache) {
  require_pointer(kernel, cache.data, "cache.data");
  if (cache.num_slots < 0) fail(kernel, "cache.num_slots ", cache.num_slots, " is negative");
  if (cache.num_kv_heads <= 0) {
    fail(kernel, "cache.num_kv_heads ", cache.num_kv_heads, " must be positive");
  }
  validate_head_dim(kernel, cache.head_dim);
}

void validate_scale_pointers(const char* kernel, const KvCacheLayer& cache,
                             const KvLayerScales& scales) {
  if (!has_kv_scales(cache.scheme)) return;  // bf16, fp8-e5m2: scale 1, pointers unused
  if (scales.k == nullptr) {
    fail(kernel, "scales.k is null: scheme ", scheme_name(cache.scheme), " needs K scales");
  }
  if (scales.v == nullptr) {
    fail(kernel, "scales.v is null: scheme ", scheme_name(cache.scheme), " needs V scales");
  }
}

void validate_heads(const char* kernel, int num_q_heads, int num_kv_heads) {
  if (num_kv_heads <= 0) fail(kernel, "num_kv_heads ", num_kv_heads, " must be positive");
  if (num_q_heads <= 0 || num_q_heads % num_kv_heads != 0) {
    fail(kernel, "num_q_heads ", num_q_heads, " is not a positive multiple of num_kv_heads ",
         num_kv_heads);
  }
}

}  // namespace

const char* attention_phase_name(AttentionPhase phase) {
  return phase == AttentionPhase::kDecode ? "decode_attention" : "prefill_attention";
}

bool is_supported_head_dim(int head_dim) {
  return head_dim == 64 || head_dim == 128 || head_dim == 256;
}

void validate_quantize_kv(const QuantizeKvParams& p) {
  const char* k = "quantize_kv";
  validate_cache(k, p.cache);
  validate_scale_pointers(k, p.cache, p.scales);
  if (p.num_tokens < 0) fail(k, "num_tokens ", p.num_tokens, " is negative");
  if (p.num_tokens > 0) {
    require_pointer(k, p.kv, "kv");
    require_pointer(k, p.slots, "slots");
  }
}

void validate_quantize_q(const QuantizeQParams& p) {
  const char* k = "quantize_q";
  if (p.num_requests <= 0) fail(k, "empty batch: num_requests ", p.num_requests);
  validate_heads(k, p.num_q_heads, p.num_kv_heads);
  validate_head_dim(k, p.head_dim);
  if (p.total_q < 0) fail(k, "total_q ", p.total_q, " is negative");
  require_pointer(k, p.cu_seqlens_q, "cu_seqlens_q");
  require_pointer(k, p.q_scale, "q_scale");
  if (p.total_q > 0) {
    require_pointer(k, p.q, "q");
    require_pointer(k, p.q_fp8, "q_fp8");
  }
}

void validate_attention(const AttentionParams& p, AttentionPhase phase) {
  const char* k = attention_phase_name(phase);
  const AttentionBatch& b = p.batch;
  if (b.num_requests <= 0) fail(k, "empty batch: num_requests ", b.num_requests);
  validate_cache(k, p.cache);
  validate_heads(k, p.num_q_heads, p.cache.num_kv_heads);
  validate_scale_pointers(k, p.cache, p.scales);
  if (fp8_q(p.cache.scheme)) {
    require_pointer(k, p.q_fp8, "q_fp8 (scheme fp8-per-head)");
    require_pointer(k, p.q_scale, "q_scale (scheme fp8-per-head)");
    require_aligned(k, p.q_fp8, "q_fp8");
  } else {
    require_pointer(k, p.q, "q");
    require_aligned(k, p.q, "q");
  }
  require_pointer(k, p.o, "o");
  require_aligned(k, p.o, "o");
  require_aligned(k, p.cache.data, "cache.data");
  require_pointer(k, b.seq_len, "batch.seq_len");
  require_pointer(k, b.cu_seqlens_q, "batch.cu_seqlens_q");
  require_pointer(k, b.req_index, "batch.req_index");
  require_pointer(k, b.req_to_token, "batch.req_to_token");
  if (b.max_requests <= 0) fail(k, "batch.max_requests ", b.max_requests, " must be positive");
  if (b.max_len <= 0) fail(k, "batch.max_len ", b.max_len, " must be positive");
  if (b.total_q < 0) fail(k, "batch.total_q ", b.total_q, " is negative");
  if (b.max_q_len < 0 || b.max_q_len > b.total_q) {
    fail(k, "batch.max_q_len ", b.max_q_len, " not in [0, total_q ", b.total_q, "]");
  }
  if (b.max_seq_len < b.max_q_len || b.max_seq_len > b.max_len) {
    fail(k, "batch.max_seq_len ", b.max_seq_len, " not in [max_q_len ", b.max_q_len, ", max_len ",
         b.max_len, "]");
  }
  if (phase == AttentionPhase::kDecode) {
    if (b.max_q_len != 1 || b.total_q != b.num_requests) {
      fail(k, "batch.max_q_len ", b.max_q_len, ", total_q ", b.total_q, " for ", b.num_requests,
           " requests: decode takes exactly one new token per request (use prefill_attention)");
    }
  } else if (b.decode_order != nullptr) {
    fail(k, "batch.decode_order is set: it orders decode_attention's requests, prefill takes none");
  }
  if (!std::isfinite(p.softmax_scale) || p.softmax_scale < 0.0f) {
    fail(k, "softmax_scale ", p.softmax_scale, " must be finite and >= 0 (0: 1/sqrt(head_dim))");
  }
}

void check_slots(const char* kernel, const int32_t* slots, int64_t num_tokens, int64_t num_slots) {
  for (int64_t t = 0; t < num_tokens; ++t) {
    if (slots[t] < 0 || slots[t] >= num_slots) {
      fail(kernel, "token ", t, ": slot ", slots[t], " out of [0, num_slots ", num_slots, ")");
    }
  }
}

void check_cu_seqlens(const char* kernel, const int32_t* cu, int num_requests, int64_t total_q) {
  if (cu[0] != 0) fail(kernel, "cu_seqlens_q[0] = ", cu[0], " must be 0");
  for (int b = 0; b < num_requests; ++b) {
    if (cu[b + 1] < cu[b]) {
      fail(kernel, "cu_seqlens_q decreases at request ", b, ": ", cu[b], " then ", cu[b + 1]);
    }
  }
  if (cu[num_requests] != total_q) {
    fail(kernel, "cu_seqlens_q[", num_requests, "] = ", cu[num_requests], " but total_q is ",
         total_q);
  }
}

void check_batch(const AttentionBatch& batch, int64_t num_slots, AttentionPhase phase) {
  const char* k = attention_phase_name(phase);
  check_cu_seqlens(k, batch.cu_seqlens_q, batch.num_requests, batch.total_q);
  for (int b = 0; b < batch.num_requests; ++b) {
    const int q_len = batch.cu_seqlens_q[b + 1] - batch.cu_seqlens_q[b];
    const int seq_len = batch.seq_len[b];
    if (phase == AttentionPhase::kDecode && q_len != 1) {
      fail(k, "request ", b, " has q_len ", q_len,
           ": decode takes exactly one new token per request (use prefill_attention)");
    }
    if (q_len > batch.max_q_len) {
      fail(k, "request ", b, " has q_len ", q_len, " > batch.max_q_len ", batch.max_q_len);
    }
    if (seq_len < q_len || seq_len > batch.max_seq_len) {
      fail(k, "request ", b, ": seq_len ", seq_len, " not in [q_len ", q_len,
           ", batch.max_seq_len ", batch.max_seq_len, "]");
    }
    if (batch.req_index[b] < 0 || batch.req_index[b] >= batch.max_requests) {
      fail(k, "request ", b, ": req_index ", batch.req_index[b], " out of [0, max_requests ",
           batch.max_requests, ")");
    }
    const int32_t* row =
        batch.req_to_token + static_cast<int64_t>(batch.req_index[b]) * batch.max_len;
    for (int pos = 0; pos < seq_len; ++pos) {
      if (row[pos] < 0 || row[pos] >= num_slots) {
        fail(k, "request ", b, " position ", pos, ": slot ", row[pos], " out of [0, num_slots ",
             num_slots, ")");
      }
    }
  }
  if (batch.decode_order != nullptr) {
    std::vector<bool> seen(static_cast<size_t>(batch.num_requests), false);
    for (int i = 0; i < batch.num_requests; ++i) {
      const int32_t b = batch.decode_order[i];
      if (b < 0 || b >= batch.num_requests) {
        fail(k, "batch.decode_order[", i, "] = ", b, " out of [0, num_requests ",
             batch.num_requests, ")");
      }
      if (seen[b]) fail(k, "batch.decode_order[", i, "] = ", b, " repeats an earlier entry");
      seen[b] = true;
    }
  }
}

void check_scales(const char* kernel, const char* what, const float* scales, int count) {
  for (int i = 0; i < count; ++i) {
    if (!std::isfinite(scales[i]) || !(scales[i] > 0.0f)) {
      fail(kernel, what, "[", i, "] = ", scales[i], " must be finite and > 0");
    }
  }
}

}  // namespace fp8kv
