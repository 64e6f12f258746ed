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

// How a pool's free slots go to requests' tokens.
//   kPages: a request's tokens at positions 64k .. 64k + 63 take the slots of one page of 64
//     consecutive slots (page p: slots 64p .. 64p + 63), at their offset position % 64, so that
//     every 64-token tile of the attention kernels reads consecutive slots (one copy per warp's
//     rows, where scattered slots take one per row: docs/GPU.md), whatever the order in which
//     the batch's requests grow. A page stays the request's until it ends; another request takes
//     one of its free slots only when no page is wholly free (a nearly full pool, or one of fewer
//     than 64 slots: the pool's capacity in tokens is never less than its slots).
//   kTokens: any free slot, the last freed first (LightLLM's token allocator): a batch that
//     decodes in steps interleaves its requests' slots.
enum class SlotPolicy { kPages, kTokens };

// The pool's free slots, host side. Deterministic: the same calls give the same slots (every
// tensor-parallel rank keeps its own).
class FP8KV_API SlotAllocator {
 public:
  static constexpr int kPageSlots = 64;  // one decode tile (kDecodeSplitAlign)
  SlotAllocator(int64_t num_slots, SlotPolicy policy);
  int64_t free_slots() const { return free_count_; }
  int64_t num_slots() const { return num_slots_; }
  SlotPolicy policy() const { return policy_; }
  bool is_free(int32_t slot) const {
    return slot >= 0 && slot < num_slots_ && free_[static_cast<size_t>(slot)] != 0;
  }
  // A free slot for a request's token at position `pos` whose token at pos - 1 sits in `prev`
  // (-1: none, pos == 0). Throws Error when no slot is free.
  int32_t take(int pos, int32_t prev);
  // Frees a slot that take() handed out (Error for one that is free or out of range).
  void give_back(int32_t slot);

 private:
  bool page_whole(int64_t page) const {
    return page_free_[static_cast<size_t>(page)] == kPageSlots;
  }
  void mark_taken(int32_t slot);
  int32_t take_loose();
  int64_t num_slots_;
  int64_t num_pages_;  // whole pages: slots num_pages_ * 64 .. num_slots_ - 1 go only one by one
  SlotPolicy policy_;
  int64_t free_count_;
  std::vector<uint8_t> free_;         // [num_slots] 1 where free
  std::vector<int32_t> page_free_;    // [num_pages] free slots of each whole page
  std::vector<int32_t> whole_pages_;  // pages that were wholly free when pushed (checked on pop)
  std::vector<int32_t> loose_;        // freed slots, last freed on top (checked on pop)
};

// Requests and their slots: req_to_token[max_requests, max_len] (int32 slot indices, in the
// backend's memory; host mirror here) plus the pool's free slots (SlotAllocator). A request is a
// row; its tokens' slots are row entries 0..seq_len-1.
class FP8KV_API RequestTable {
 public:
  RequestTable(Backend& backend, int max_requests, int max_len, int64_t num_slots,
               SlotPolicy policy = SlotPolicy::kPages);

  // A fresh request (row) with no tokens. Throws Error when every row is in use.
  int add_request();
  // Frees the request's row and slots.
  void release(int req);
  int seq_len(int req) const;
  int64_t free_slots() const { return slots_.free_slots(); }
  int max_len() const { return max_len_; }
  int max_requests() const { return max_requests_; }
  SlotPolicy slot_policy() const { return slots_.policy(); }

  // Appends counts[b] tokens to request reqs[b] for every b, all or nothing: throws Error (and
  // changes nothing) when the slots needed exceed the free ones (saying how many of each) or a
  // request would exceed max_len. Returns the new tokens' slots in batch order, and uploads the
  // changed rows. `by_steps`: the slots are taken a token per request in turn (position by
  // position), in the order a batch that decodes in steps takes them; else request by request.
  std::vector<int32_t> extend(const std::vector<int>& reqs, const std::vector<int>& counts,
                              bool by_steps = false);

  const int32_t* device_table() const { return table_dev_.as<const int32_t>(); }

 private:
  void check_req(int req) const;
  Backend& backend_;
  int max_requests_;
  int max_len_;
  int64_t num_slots_;
  std::vector<int32_t> table_;  // [max_requests, max_len] host mirror
  std::vector<int> seq_len_;    // [max_requests], -1 when the row is free
  SlotAllocator slots_;
  BackendBuffer table_dev_;
};

}  // namespace fp8kv
