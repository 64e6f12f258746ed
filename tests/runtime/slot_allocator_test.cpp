// The pool's slot allocator (SlotAllocator, RequestTable): pages of 64 slots per request window,
// LightLLM's token order as the other policy, capacity, errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "fp8kv/backend.h"
#include "fp8kv/error.h"
#include "fp8kv/kv_pool.h"

namespace fp8kv {
namespace {

constexpr int kPage = SlotAllocator::kPageSlots;

// Requests growing on one allocator, as RequestTable::extend grows them.
struct Requests {
  SlotAllocator alloc;
  std::vector<std::vector<int32_t>> slots;  // [request][position]
  Requests(int64_t num_slots, SlotPolicy policy, int n) : alloc(num_slots, policy), slots(n) {}
  void grow(int r, int count) {
    auto& row = slots[static_cast<size_t>(r)];
    for (int i = 0; i < count; ++i) {
      const int pos = static_cast<int>(row.size());
      row.push_back(alloc.take(pos, pos > 0 ? row.back() : -1));
    }
  }
  void release(int r) {
    auto& row = slots[static_cast<size_t>(r)];
    for (auto it = row.rbegin(); it != row.rend(); ++it) alloc.give_back(*it);
    row.clear();
  }
  // Windows of 64 positions whose slots are not page start + position % 64 (the last, partial
  // window included).
  int broken_windows(int r) const {
    const auto& row = slots[static_cast<size_t>(r)];
    int broken = 0;
    for (size_t w = 0; w < row.size(); w += kPage) {
      const int32_t base = row[w] - static_cast<int32_t>(w % kPage);
      bool ok = base % kPage == 0;
      for (size_t i = w; i < std::min(row.size(), w + kPage); ++i)
        ok = ok && row[i] == base + static_cast<int32_t>(i % kPage);
      broken += ok ? 0 : 1;
    }
    return broken;
  }
  // Every live slot distinct and in the pool.
  void expect_distinct(int64_t num_slots) const {
    std::set<int32_t> seen;
    size_t live = 0;
    for (const auto& row : slots) {
      for (int32_t s : row) {
        ASSERT_GE(s, 0);
        ASSERT_LT(s, num_slots);
        seen.insert(s);
      }
      live += row.size();
    }
    EXPECT_EQ(seen.size(), live);
    EXPECT_EQ(alloc.free_slots(), num_slots - static_cast<int64_t>(live));
  }
};

// A batch prefilled, then decoded in lockstep (a token per request per step): the order in which
// a serving engine grows its requests.
void prefill_then_decode(Requests& q, const std::vector<int>& prompts, int steps) {
  for (size_t r = 0; r < prompts.size(); ++r) q.grow(static_cast<int>(r), prompts[r]);
  for (int s = 0; s < steps; ++s) {
    for (size_t r = 0; r < prompts.size(); ++r) q.grow(static_cast<int>(r), 1);
  }
}

TEST(SlotAllocator, PagesKeepEveryWindowOfADecodingBatchConsecutive) {
  const std::vector<int> prompts = {0, 1, 63, 64, 100, 7};
  Requests pages(64 * 40 + 17, SlotPolicy::kPages, 6);
  prefill_then_decode(pages, prompts, 300);
  pages.expect_distinct(64 * 40 + 17);
  for (int r = 0; r < 6; ++r) EXPECT_EQ(pages.broken_windows(r), 0) << "request " << r;

  // The token policy interleaves the same batch's decoded tokens.
  Requests tokens(64 * 40 + 17, SlotPolicy::kTokens, 6);
  prefill_then_decode(tokens, prompts, 300);
  tokens.expect_distinct(64 * 40 + 17);
  for (int r = 0; r < 6; ++r) EXPECT_GE(tokens.broken_windows(r), 4) << "request " << r;
}

TEST(SlotAllocator, TokenPolicyHandsOutSlotZeroFirstAndTheLastFreedNext) {
  SlotAllocator a(10, SlotPolicy::kTokens);
  for (int32_t s = 0; s < 4; ++s) EXPECT_EQ(a.take(0, -1), s);
  a.give_back(2);
  a.give_back(0);
  EXPECT_EQ(a.take(5, 3), 0);
  EXPECT_EQ(a.take(0, -1), 2);
  EXPECT_EQ(a.take(0, -1), 4);
  EXPECT_EQ(a.free_slots(), 5);
}

TEST(SlotAllocator, EverySlotIsHandedOutBeforeThePoolIsFull) {
  // 3 whole pages and 10 slots past them; 4 requests reserve more pages than exist, so the last
  // windows take other pages' free slots one by one: the pool still fills to its last slot.
  for (SlotPolicy policy : {SlotPolicy::kPages, SlotPolicy::kTokens}) {
    const int64_t n = 3 * kPage + 10;
    Requests q(n, policy, 4);
    int64_t taken = 0;
    for (int step = 0; taken < n; ++step) {
      q.grow(step % 4, 1);
      ++taken;
    }
    q.expect_distinct(n);
    EXPECT_EQ(q.alloc.free_slots(), 0);
    std::string e;
    try {
      q.alloc.take(0, -1);
    } catch (const Error& err) {
      e = err.what();
    }
    EXPECT_NE(e.find("out of KV cache slots: all 202 are in use"), std::string::npos) << e;
    // Freed, a request's pages serve the next one whole again.
    for (int r = 0; r < 4; ++r) q.release(r);
    EXPECT_EQ(q.alloc.free_slots(), n);
    q.grow(0, 3 * kPage);
    q.expect_distinct(n);
    if (policy == SlotPolicy::kPages) EXPECT_EQ(q.broken_windows(0), 0);
  }
}

TEST(SlotAllocator, AWindowWhoseNextSlotWasTakenGoesOnInAFreshPage) {
  // Three whole pages. Request 0 holds offsets 0..9 of page 0, requests 1 and 2 pages 1 and 2;
  // with no whole page left, request 3 takes a loose slot: page 0's lowest free one.
  SlotAllocator a(3 * kPage, SlotPolicy::kPages);
  std::vector<int32_t> r0;
  for (int pos = 0; pos < 10; ++pos) r0.push_back(a.take(pos, pos ? r0.back() : -1));
  EXPECT_EQ(r0.front(), 0);
  EXPECT_EQ(r0.back(), 9);
  EXPECT_EQ(a.take(0, -1), kPage);
  EXPECT_EQ(a.take(0, -1), 2 * kPage);
  EXPECT_EQ(a.take(0, -1), 10);
  // Request 1 ends: page 1 is whole again, and request 0's position 10, whose slot request 3
  // took, starts there at its offset; position 11 follows it.
  a.give_back(kPage);
  const int32_t p10 = a.take(10, r0.back());
  EXPECT_EQ(p10, kPage + 10);
  EXPECT_EQ(a.take(11, p10), kPage + 11);
  // With no whole page, a token off its page's offsets takes a loose slot: the last freed.
  EXPECT_EQ(a.take(1, 10), kPage);
  EXPECT_EQ(a.free_slots(), 3 * kPage - 15);
}

TEST(SlotAllocator, ChurnKeepsSlotsDistinctAndCountsRight) {
  // Requests of random lengths come and go on a pool that has room (pages) or is nearly full
  // (pages broken for capacity): every live slot distinct, the free count right; with room, every
  // window whole.
  const uint64_t seed = 20261204;
  SCOPED_TRACE("seed " + std::to_string(seed));
  for (SlotPolicy policy : {SlotPolicy::kPages, SlotPolicy::kTokens}) {
    for (int64_t num_slots : {int64_t{64 * 64}, int64_t{64 * 9 + 33}}) {
      const int kReqs = 8;
      Requests q(num_slots, policy, kReqs);
      std::mt19937_64 rng(seed);
      std::vector<int> target(kReqs, 0);
      for (int step = 0; step < 4000; ++step) {
        const int r = static_cast<int>(rng() % kReqs);
        if (q.slots[static_cast<size_t>(r)].size() >= static_cast<size_t>(target[r]) ||
            q.alloc.free_slots() == 0) {
          q.release(r);
          target[r] = 1 + static_cast<int>(rng() % 500);
        }
        const int want = rng() % 4 == 0 ? 1 + static_cast<int>(rng() % 120) : 1;
        const int room = target[r] - static_cast<int>(q.slots[static_cast<size_t>(r)].size());
        const int n = std::min<int64_t>({want, room, q.alloc.free_slots()});
        q.grow(r, n);
      }
      q.expect_distinct(num_slots);
      if (policy == SlotPolicy::kPages && num_slots == 64 * 64) {
        // 8 requests of at most 500 tokens hold at most 8 x 8 pages: never short of whole pages.
        for (int r = 0; r < kReqs; ++r) EXPECT_EQ(q.broken_windows(r), 0) << "request " << r;
      }
    }
  }
}

TEST(SlotAllocator, RefusesBadSlotsAndSizes) {
  SlotAllocator a(100, SlotPolicy::kPages);
  const int32_t s = a.take(0, -1);
  a.give_back(s);
  auto error_of = [](auto f) {
    try {
      f();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  EXPECT_NE(error_of([&] { a.give_back(s); }).find("slot 0 is free already"), std::string::npos);
  EXPECT_NE(error_of([&] { a.give_back(100); }).find("slot 100 is outside the pool of 100"),
            std::string::npos);
  EXPECT_NE(error_of([] { SlotAllocator(0, SlotPolicy::kPages); }).find("num_slots"),
            std::string::npos);
  EXPECT_NE(error_of([] {
              SlotAllocator(int64_t{1} << 40, SlotPolicy::kTokens);
            }).find("num_slots must be in 1..2147483647, got 1099511627776"),
            std::string::npos);
  EXPECT_EQ(a.free_slots(), 100);
}

TEST(RequestTable, ExtendGivesADecodingBatchWholePages) {
  auto backend = make_cpu_backend();
  RequestTable t(*backend, 4, 1024, 64 * 32);
  std::vector<int> reqs;
  for (int i = 0; i < 4; ++i) reqs.push_back(t.add_request());
  std::vector<std::vector<int32_t>> rows(4);
  const std::vector<int> prompts = {5, 64, 130, 1};
  auto append = [&](const std::vector<int32_t>& slots, const std::vector<int>& counts) {
    size_t k = 0;
    for (size_t b = 0; b < counts.size(); ++b) {
      for (int i = 0; i < counts[b]; ++i) rows[b].push_back(slots[k++]);
    }
  };
  append(t.extend(reqs, prompts), prompts);
  for (int step = 0; step < 200; ++step) append(t.extend(reqs, {1, 1, 1, 1}), {1, 1, 1, 1});
  for (size_t b = 0; b < 4; ++b) {
    ASSERT_EQ(static_cast<int>(rows[b].size()), t.seq_len(reqs[b]));
    for (size_t i = 0; i < rows[b].size(); ++i) {
      ASSERT_EQ(rows[b][i] % kPage, static_cast<int32_t>(i % kPage)) << "request " << b;
      if (i % kPage != 0) ASSERT_EQ(rows[b][i], rows[b][i - 1] + 1) << "request " << b;
    }
  }
  t.release(reqs[2]);
  EXPECT_EQ(t.free_slots(), 64 * 32 - (205 + 264 + 201));
}

// extend(..., by_steps) takes the slots a token per request in turn: the slots of one-token
// steps, returned in batch order; and it refuses as a whole, changing nothing.
TEST(RequestTable, ExtendByStepsTakesTheSlotsOfOneTokenSteps) {
  auto backend = make_cpu_backend();
  for (SlotPolicy policy : {SlotPolicy::kPages, SlotPolicy::kTokens}) {
    RequestTable steps(*backend, 4, 256, 64 * 8, policy), once(*backend, 4, 256, 64 * 8, policy);
    std::vector<int> reqs;
    for (int i = 0; i < 4; ++i) reqs.push_back(steps.add_request()), once.add_request();
    const std::vector<int> counts = {70, 3, 0, 130};
    std::vector<std::vector<int32_t>> rows(4);
    for (int i = 0; i < 130; ++i) {
      std::vector<int> live, ones;
      for (int b = 0; b < 4; ++b) {
        if (i < counts[b]) live.push_back(reqs[b]), ones.push_back(1);
      }
      const std::vector<int32_t> got = steps.extend(live, ones);
      for (size_t k = 0, b = 0; b < 4; ++b) {
        if (i < counts[b]) rows[b].push_back(got[k++]);
      }
    }
    std::vector<int32_t> expected;
    for (const auto& r : rows) expected.insert(expected.end(), r.begin(), r.end());
    EXPECT_EQ(once.extend(reqs, counts, /*by_steps=*/true), expected);
    EXPECT_THROW(once.extend(reqs, {1, 1, 300, 1}, true), Error);
    EXPECT_EQ(once.free_slots(), 64 * 8 - 203);
    EXPECT_EQ(once.seq_len(reqs[3]), 130);
  }
}

}  // namespace
}  // namespace fp8kv
