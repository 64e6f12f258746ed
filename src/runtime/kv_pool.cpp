#include "fp8kv/kv_pool.h"

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <string>
#include <utility>

#include "fp8kv/error.h"
#include "kernels/decode_split.h"

namespace fp8kv {

// ---- KvPool --------------------------------------------------------------------------------

KvPool::KvPool(Backend& backend, int num_layers, int64_t num_slots, int num_kv_heads, int head_dim,
               KvScheme scheme, const std::vector<int>& bf16_layers)
    : num_slots_(num_slots),
      num_kv_heads_(num_kv_heads),
      head_dim_(head_dim),
      scheme_(scheme),
      layer_schemes_(static_cast<size_t>(std::max(num_layers, 0)), scheme) {
  if (num_slots <= 0)
    throw Error("KV pool: num_slots must be positive, got " + std::to_string(num_slots));
  for (int l : bf16_layers) {
    if (l < 0 || l >= num_layers) {
      throw Error("--kv-bf16-layers: layer " + std::to_string(l) + ", but the model has " +
                  std::to_string(num_layers) + " layers (0.." + std::to_string(num_layers - 1) +
                  ")");
    }
    layer_schemes_[static_cast<size_t>(l)] = KvScheme::kBf16;
  }
  for (int l = 0; l < num_layers; ++l) {
    const size_t bytes = static_cast<size_t>(num_slots + 1) * 2 * num_kv_heads * head_dim *
                         kv_elem_bytes(layer_schemes_[static_cast<size_t>(l)]);
    layers_.emplace_back(backend, bytes);
    backend.memset(layers_.back().get(), 0, bytes);
  }
}

KvCacheLayer KvPool::layer(int l) const {
  KvCacheLayer c;
  c.data = layers_.at(static_cast<size_t>(l)).get();
  c.num_slots = num_slots_;
  c.num_kv_heads = num_kv_heads_;
  c.head_dim = head_dim_;
  c.scheme = layer_schemes_.at(static_cast<size_t>(l));
  return c;
}

size_t KvPool::bytes() const {
  size_t b = 0;
  for (const auto& l : layers_) b += l.bytes();
  return b;
}

// ---- SlotAllocator -------------------------------------------------------------------------

static_assert(SlotAllocator::kPageSlots == cuda::kDecodeSplitAlign,
              "a page is one decode tile: its rows are one copy per warp");

namespace {
int64_t checked_slot_count(int64_t num_slots) {
  if (num_slots <= 0 || num_slots > INT32_MAX) {
    throw Error("slot allocator: num_slots must be in 1.." + std::to_string(INT32_MAX) + ", got " +
                std::to_string(num_slots));
  }
  return num_slots;
}
}  // namespace

SlotAllocator::SlotAllocator(int64_t num_slots, SlotPolicy policy)
    : num_slots_(checked_slot_count(num_slots)),
      num_pages_(policy == SlotPolicy::kPages ? num_slots_ / kPageSlots : 0),
      policy_(policy),
      free_count_(num_slots),
      free_(static_cast<size_t>(num_slots_), 1),
      page_free_(static_cast<size_t>(num_pages_), kPageSlots) {
  // Handed out from the back: slot 0 and page 0 first.
  loose_.resize(static_cast<size_t>(num_slots));
  for (int64_t i = 0; i < num_slots; ++i)
    loose_[static_cast<size_t>(i)] = static_cast<int32_t>(num_slots - 1 - i);
  whole_pages_.resize(static_cast<size_t>(num_pages_));
  for (int64_t i = 0; i < num_pages_; ++i)
    whole_pages_[static_cast<size_t>(i)] = static_cast<int32_t>(num_pages_ - 1 - i);
}

void SlotAllocator::mark_taken(int32_t slot) {
  free_[static_cast<size_t>(slot)] = 0;
  --free_count_;
  if (slot / kPageSlots < num_pages_) --page_free_[static_cast<size_t>(slot / kPageSlots)];
}

// Invariants: every free slot has an entry in loose_ (entries of taken slots are skipped when
// popped), and every wholly free page one in whole_pages_ (a page leaves wholeness only by a pop
// of whole_pages_: take() empties whole_pages_ before it takes a loose slot, so a loose slot is
// never in a whole page).
int32_t SlotAllocator::take_loose() {
  while (!loose_.empty()) {
    const int32_t s = loose_.back();
    loose_.pop_back();
    if (free_[static_cast<size_t>(s)]) {
      mark_taken(s);
      return s;
    }
  }
  throw Error("slot allocator: no free slot among " + std::to_string(free_count_) +
              " counted free (internal)");
}

int32_t SlotAllocator::take(int pos, int32_t prev) {
  if (free_count_ == 0) {
    throw Error("out of KV cache slots: all " + std::to_string(num_slots_) + " are in use");
  }
  if (policy_ == SlotPolicy::kPages) {
    const int offset = pos % kPageSlots;
    // The next slot of the request's page, where its previous token sits at its own offset.
    if (offset != 0 && prev >= 0 && prev % kPageSlots == offset - 1 &&
        prev / kPageSlots < num_pages_ && free_[static_cast<size_t>(prev) + 1]) {
      mark_taken(prev + 1);
      return prev + 1;
    }
    // Else a wholly free page (also for a request whose page another took a slot of: its
    // following tokens align again).
    while (!whole_pages_.empty()) {
      const int32_t page = whole_pages_.back();
      whole_pages_.pop_back();
      if (page_whole(page)) {
        const int32_t s = page * kPageSlots + offset;
        mark_taken(s);
        return s;
      }
    }
  }
  return take_loose();
}

void SlotAllocator::give_back(int32_t slot) {
  if (slot < 0 || slot >= num_slots_ || free_[static_cast<size_t>(slot)]) {
    throw Error("slot allocator: slot " + std::to_string(slot) +
                (slot < 0 || slot >= num_slots_
                     ? " is outside the pool of " + std::to_string(num_slots_)
                     : std::string(" is free already")));
  }
  free_[static_cast<size_t>(slot)] = 1;
  ++free_count_;
  loose_.push_back(slot);
  if (slot / kPageSlots < num_pages_ &&
      ++page_free_[static_cast<size_t>(slot / kPageSlots)] == kPageSlots) {
    whole_pages_.push_back(slot / kPageSlots);
  }
  // The page policy leaves the entries of slots it took in loose_: rebuild it (every free slot,
  // the lowest on top) before it outgrows twice the pool.
  if (static_cast<int64_t>(loose_.size()) > 2 * num_slots_) {
    loose_.clear();
    for (int64_t s = num_slots_ - 1; s >= 0; --s) {
      if (free_[static_cast<size_t>(s)]) loose_.push_back(static_cast<int32_t>(s));
    }
  }
}

// ---- RequestTable --------------------------------------------------------------------------

RequestTable::RequestTable(Backend& backend, int max_requests, int max_len, int64_t num_slots,
                           SlotPolicy policy)
    : backend_(backend),
      max_requests_(max_requests),
      max_len_(max_len),
      num_slots_(num_slots),
      table_(static_cast<size_t>(max_requests) * max_len, static_cast<int32_t>(num_slots)),
      seq_len_(static_cast<size_t>(max_requests), -1),
      slots_(num_slots, policy),
      table_dev_(backend, static_cast<size_t>(max_requests) * max_len * sizeof(int32_t)) {
  if (max_requests <= 0 || max_len <= 0) {
    throw Error("request table: max_requests and max_len must be positive, got " +
                std::to_string(max_requests) + " and " + std::to_string(max_len));
  }
  // Unused entries point at the padding slot.
  table_dev_.upload(table_.data(), table_.size() * sizeof(int32_t));
}

void RequestTable::check_req(int req) const {
  if (req < 0 || req >= max_requests_ || seq_len_[static_cast<size_t>(req)] < 0) {
    throw Error("request " + std::to_string(req) + " is not an active request");
  }
}

int RequestTable::add_request() {
  for (int r = 0; r < max_requests_; ++r) {
    if (seq_len_[static_cast<size_t>(r)] < 0) {
      seq_len_[static_cast<size_t>(r)] = 0;
      return r;
    }
  }
  throw Error("request table full: all " + std::to_string(max_requests_) + " requests are in use");
}

void RequestTable::release(int req) {
  check_req(req);
  int32_t* row = table_.data() + static_cast<size_t>(req) * max_len_;
  for (int i = seq_len_[static_cast<size_t>(req)] - 1; i >= 0; --i) {
    slots_.give_back(row[i]);
    row[i] = static_cast<int32_t>(num_slots_);
  }
  seq_len_[static_cast<size_t>(req)] = -1;
}

int RequestTable::seq_len(int req) const {
  check_req(req);
  return seq_len_[static_cast<size_t>(req)];
}

std::vector<int32_t> RequestTable::extend(const std::vector<int>& reqs,
                                          const std::vector<int>& counts, bool by_steps) {
  if (reqs.size() != counts.size()) throw Error("RequestTable::extend: reqs/counts size differ");
  int64_t needed = 0;
  for (size_t b = 0; b < reqs.size(); ++b) {
    check_req(reqs[b]);
    for (size_t c = 0; c < b; ++c) {
      if (reqs[c] == reqs[b]) {
        throw Error("request " + std::to_string(reqs[b]) + " appears twice in one batch");
      }
    }
    if (counts[b] < 0) throw Error("negative token count for request " + std::to_string(reqs[b]));
    const int len = seq_len_[static_cast<size_t>(reqs[b])];
    if (static_cast<int64_t>(len) + counts[b] > max_len_) {
      throw Error("request " + std::to_string(reqs[b]) + " would have " +
                  std::to_string(len + counts[b]) + " tokens, more than max_len " +
                  std::to_string(max_len_));
    }
    needed += counts[b];
  }
  if (needed > free_slots()) {
    throw Error("out of KV cache slots: this batch needs " + std::to_string(needed) +
                " new slots, " + std::to_string(free_slots()) + " of " +
                std::to_string(num_slots_) + " are free");
  }
  // Token i of request b goes to row position seq_len + i, and to the result at first[b] + i.
  std::vector<size_t> first(reqs.size());
  for (size_t b = 0, at = 0; b < reqs.size(); at += static_cast<size_t>(counts[b]), ++b)
    first[b] = at;
  std::vector<int32_t> slots(static_cast<size_t>(needed));
  auto take = [&](size_t b, int i) {
    int32_t* row = table_.data() + static_cast<size_t>(reqs[b]) * max_len_;
    const int pos = seq_len_[static_cast<size_t>(reqs[b])] + i;
    row[pos] = slots_.take(pos, pos > 0 ? row[pos - 1] : -1);
    slots[first[b] + static_cast<size_t>(i)] = row[pos];
  };
  if (by_steps) {
    const int most = reqs.empty() ? 0 : *std::max_element(counts.begin(), counts.end());
    for (int i = 0; i < most; ++i) {
      for (size_t b = 0; b < reqs.size(); ++b) {
        if (i < counts[b]) take(b, i);
      }
    }
  } else {
    for (size_t b = 0; b < reqs.size(); ++b) {
      for (int i = 0; i < counts[b]; ++i) take(b, i);
    }
  }
  for (size_t b = 0; b < reqs.size(); ++b) {
    const size_t r = static_cast<size_t>(reqs[b]);
    const int32_t* row = table_.data() + r * max_len_;
    const int start = seq_len_[r];
    seq_len_[r] = start + counts[b];
    if (counts[b] > 0) {
      backend_.upload(table_dev_.as<int32_t>() + r * max_len_ + start, row + start,
                      static_cast<size_t>(counts[b]) * sizeof(int32_t));
    }
  }
  return slots;
}

}  // namespace fp8kv
