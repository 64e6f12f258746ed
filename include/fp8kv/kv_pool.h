// Memory of the runtime: the token-slot KV pool and the request table
// (docs/DESIGN.md, "Data layout").
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "fp8kv/backend.h"
#include "fp8kv/buffer.h"
#include "fp8kv/export.h"
#include "fp8kv/scheme.h"

namespace fp8kv {

// The KV pool: per layer [num_slots + 1, 2 * Hkv, D] (bf16 or e4m3), slot num_slots being the
// padding slot. Zero-filled at creation. `bf16_layers` (--kv-bf16-layers) keeps those layers in
// bf16 in an FP8 pool: their KvCacheLayer says kBf16, and the attention of that layer runs the
// bf16 path; the scales of every layer stay where they are. Throws Error naming a layer that
// the model does not have.
class FP8KV_API KvPool {
 public:
  KvPool(Backend& backend, int num_layers, int64_t num_slots, int num_kv_heads, int head_dim,
         KvScheme scheme, const std::vector<int>& bf16_layers = {});
  KvCacheLayer layer(int l) const;  // its scheme: kBf16 for a bf16 layer, else the pool's
  int num_layers() const { return static_cast<int>(layers_.size()); }
  int64_t num_slots() const { return num_slots_; }
  KvScheme scheme() const { return scheme_; }
  size_t bytes() const;  // all layers

 private:
  std::vector<BackendBuffer> layers_;
  int64_t num_slots_;
  int num_kv_heads_;
  int head_dim_;
  KvScheme scheme_;
  std::vector<KvScheme> layer_schemes_;  // [num_layers]
};

// Requests and their slots: req_to_token[max_requests, max_len] (int32 slot indices, in the
// backend's memory; host mirror here) plus a free list of slots. A request is a row; its
// tokens' slots are row entries 0..seq_len-1.
class FP8KV_API RequestTable {
 public:
  RequestTable(Backend& backend, int max_requests, int max_len, int64_t num_slots);

  // A fresh request (row) with no tokens. Throws Error when every row is in use.
  int add_request();
  // Frees the request's row and slots.
  void release(int req);
  int seq_len(int req) const;
  int64_t free_slots() const { return static_cast<int64_t>(free_.size()); }
  int max_len() const { return max_len_; }
  int max_requests() const { return max_requests_; }

  // Appends counts[b] tokens to request reqs[b] for every b, all or nothing: throws Error (and
  // changes nothing) when the slots needed exceed the free ones (saying how many of each) or a
  // request would exceed max_len. Returns the new tokens' slots in batch order, and uploads the
  // changed rows.
  std::vector<int32_t> extend(const std::vector<int>& reqs, const std::vector<int>& counts);

  const int32_t* device_table() const { return table_dev_.as<const int32_t>(); }

 private:
  void check_req(int req) const;
  Backend& backend_;
  int max_requests_;
  int max_len_;
  int64_t num_slots_;
  std::vector<int32_t> table_;  // [max_requests, max_len] host mirror
  std::vector<int> seq_len_;    // [max_requests], -1 when the row is free
  std::vector<int32_t> free_;   // free slots, handed out from the back
  BackendBuffer table_dev_;
};

}  // namespace fp8kv
