// The split-KV heuristic of decode attention (kernels/decode_split.h): host code, no GPU needed.
#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "fp8kv/backend.h"
#include "fp8kv/error.h"
#include "kernels/decode_split.h"

namespace fp8kv {
namespace {

TEST(DecodeSplit, ShortContextsAreNotSplit) {
  const auto s = cuda::choose_decode_split(8, 132, 200);
  EXPECT_EQ(s.num_splits, 1);
  EXPECT_EQ(s.split_tokens, 200);
}

TEST(DecodeSplit, SmallBatchLongContextFillsTheSmsOnce) {
  // B=4, Hkv=8, two KV heads a CTA: 16 CTAs on 132 SMs: split until every SM but a few holds
  // one CTA, and no further (a second CTA on an SM would only share its bandwidth).
  const auto s = cuda::choose_decode_split(16, 132, 32768);
  EXPECT_EQ(s.num_splits, 8);
  EXPECT_EQ(s.split_tokens, 4096);
  EXPECT_EQ(s.split_tokens % cuda::kDecodeSplitAlign, 0);
  // One long request (B=1 L=131072, four CTAs): 33 splits, one CTA on each of the 132 SMs.
  const auto one = cuda::choose_decode_split(4, 132, 131072);
  EXPECT_EQ(one.num_splits, 33);
  EXPECT_GE(static_cast<int64_t>(one.num_splits) * one.split_tokens, 131072);
  EXPECT_LT(static_cast<int64_t>(one.num_splits - 1) * one.split_tokens, 131072);  // no empty one
  // Its splits merge in one level: at 33 that measured faster than sub-groups first (H200,
  // fp8-per-head 73.9 -> 72.6 us; docs/GPU.md, fifty-fifth session).
  EXPECT_LE(one.num_splits, cuda::kDecodeTwoLevelMergeAbove);
}

// A grid that already puts a CTA on (nearly) every SM is not split into two CTAs an SM, whatever
// the SM could hold: FP8 at head_dim 64 (B=64, four KV heads a CTA) and GQA 7 (Hkv=4, two a CTA),
// 128 CTAs each.
TEST(DecodeSplit, NoSplitThatOnlyDoublesUpCtasOnTheSms) {
  EXPECT_EQ(cuda::choose_decode_split(128, 132, 4096).num_splits, 1);
  EXPECT_EQ(cuda::choose_decode_split(132, 132, 1 << 20).num_splits, 1);
  // Half the SMs busy: two splits fill them.
  EXPECT_EQ(cuda::choose_decode_split(66, 132, 4096).num_splits, 2);
}

// A launch left at one CTA an SM or fewer takes twice the splits from 4096 keys where the SM holds
// two CTAs, unless the caller's slots lie in pages (double_one_wave_split): unsplit, two; split to
// fill the SMs once, twice as many, up to kDecodeMaxSplits.
TEST(DecodeSplit, TwiceTheSplitsForALongOneWaveLaunchOfSlotsNotInPages) {
  const cuda::DecodeSplit one = cuda::choose_decode_split(128, 132, 16384);
  ASSERT_EQ(one.num_splits, 1);
  const cuda::DecodeSplit pair = cuda::double_one_wave_split(one, 128, 132, 2, 16384, false);
  EXPECT_EQ(pair.num_splits, 2);
  EXPECT_EQ(pair.split_tokens, 8192);
  // An odd length: half of it rounded up to whole tiles, no empty split.
  const cuda::DecodeSplit odd = cuda::double_one_wave_split({1, 4097}, 132, 132, 3, 4097, false);
  EXPECT_EQ(odd.num_splits, 2);
  EXPECT_EQ(odd.split_tokens, 2112);
  EXPECT_EQ(odd.split_tokens % cuda::kDecodeSplitAlign, 0);
  EXPECT_GE(2 * odd.split_tokens, 4097);
  EXPECT_LT(odd.split_tokens, 4097);
  // Split launches: B=4 L=32768 (16 CTAs, 8 splits) takes 16; B=1 L=131072 (4 CTAs, 33 splits)
  // the most there are, 64; neither leaves an empty split.
  const cuda::DecodeSplit eight = cuda::choose_decode_split(16, 132, 32768);
  ASSERT_EQ(eight.num_splits, 8);
  const cuda::DecodeSplit sixteen = cuda::double_one_wave_split(eight, 16, 132, 2, 32768, false);
  EXPECT_EQ(sixteen.num_splits, 16);
  EXPECT_EQ(sixteen.split_tokens, 2048);
  const cuda::DecodeSplit many = cuda::double_one_wave_split(
      cuda::choose_decode_split(4, 132, 131072), 4, 132, 2, 131072, false);
  EXPECT_EQ(many.num_splits, cuda::kDecodeMaxSplits);
  EXPECT_GE(static_cast<int64_t>(many.num_splits) * many.split_tokens, 131072);
  EXPECT_LT(static_cast<int64_t>(many.num_splits - 1) * many.split_tokens, 131072);
  // Each condition alone keeps the launch as it was.
  auto same = [](const cuda::DecodeSplit& a, const cuda::DecodeSplit& b) {
    return a.num_splits == b.num_splits && a.split_tokens == b.split_tokens;
  };
  EXPECT_TRUE(same(cuda::double_one_wave_split(one, 128, 132, 2, 16384, true), one));  // pages
  EXPECT_TRUE(same(cuda::double_one_wave_split(eight, 16, 132, 2, 32768, true), eight));
  EXPECT_TRUE(same(cuda::double_one_wave_split(one, 128, 132, 1, 16384, false), one));  // SM of 1
  EXPECT_TRUE(same(cuda::double_one_wave_split(one, 133, 132, 2, 16384, false), one));  // 2 waves
  EXPECT_TRUE(same(cuda::double_one_wave_split(eight, 17, 132, 2, 32768, false), eight));
  EXPECT_TRUE(same(cuda::double_one_wave_split(one, 0, 132, 2, 16384, false), one));  // no CTA
  EXPECT_EQ(cuda::double_one_wave_split({1, 4095}, 128, 132, 2, 4095, false).num_splits, 1);
  // Splits that would fall below kDecodeMinSplitTokens keys stay as they were.
  const cuda::DecodeSplit short_splits{16, 256};
  EXPECT_TRUE(
      same(cuda::double_one_wave_split(short_splits, 8, 132, 2, 4096, false), short_splits));
}

TEST(DecodeSplit, LargeBatchIsNotSplit) {
  EXPECT_EQ(cuda::choose_decode_split(2048, 132, 1024).num_splits, 1);
}

// The split merge counts arrivals in kDecodeMaxSplitGroups counters: a grid of more unsplit CTAs
// is never split, even where the GPU (here a huge one) would hold its splits.
TEST(DecodeSplit, GroupsBeyondTheCountersAreNotSplit) {
  constexpr int64_t kHuge = int64_t{1} << 30;
  EXPECT_GT(cuda::choose_decode_split(cuda::kDecodeMaxSplitGroups, kHuge, 1 << 20).num_splits, 1);
  EXPECT_EQ(cuda::choose_decode_split(cuda::kDecodeMaxSplitGroups + 1, kHuge, 1 << 20).num_splits,
            1);
}

TEST(DecodeSplit, BoundsHold) {
  for (int64_t ctas : {1, 3, 17, 64, 132, 500, 5000}) {
    for (int len : {1, 255, 256, 257, 1000, 4096, 100000, 1 << 20}) {
      const auto s = cuda::choose_decode_split(ctas, 132, len);
      ASSERT_GE(s.num_splits, 1);
      ASSERT_LE(s.num_splits, cuda::kDecodeMaxSplits);
      ASSERT_GE(static_cast<int64_t>(s.num_splits) * s.split_tokens, len);
      if (s.num_splits > 1) {
        ASSERT_GE(s.split_tokens, cuda::kDecodeMinSplitTokens);
        ASSERT_LT(static_cast<int64_t>(s.num_splits - 1) * s.split_tokens, len);
      }
    }
  }
}

// The persistent kernel takes unsplit grids of kDecodePersistentWaves waves or more, never a
// split launch, never where the instance does not exist (resident 0).
TEST(DecodeSplit, PersistentForUnsplitGridsOfSeveralWaves) {
  const int64_t resident = 132;  // 132 SMs, one CTA each
  const int64_t from = cuda::kDecodePersistentWaves * resident;
  EXPECT_FALSE(cuda::decode_persistent(from - 1, resident, 1));
  EXPECT_TRUE(cuda::decode_persistent(from, resident, 1));
  EXPECT_TRUE(cuda::decode_persistent(100 * resident, resident, 1));
  EXPECT_FALSE(cuda::decode_persistent(100 * resident, resident, 2));
  EXPECT_FALSE(cuda::decode_persistent(100 * resident, 0, 1));
  // FP8 at head_dim 128, 8 KV heads, four per item: B=64 is one wave, B=256 about four.
  EXPECT_FALSE(cuda::decode_persistent(64 * 2, resident, 1));
  EXPECT_TRUE(cuda::decode_persistent(256 * 2, resident, 1));
}

// The longest-first order's key rises with a request's tiles (never falls), 8 buckets an octave,
// and stays in its kDecodeOrderBuckets; the twin orders by it, descending, keeping the index
// order within a bucket; decode_order_longest_first orders seq_len by whole tiles of 64 keys.
TEST(DecodeSplit, LongestFirstOrderByTileBuckets) {
  EXPECT_EQ(cuda::decode_order_key(0), 0);
  EXPECT_EQ(cuda::decode_order_key(-3), 0);
  int last = 0;
  for (int tiles = 1; tiles < (1 << 20); tiles += 1 + tiles / 37) {
    const int k = cuda::decode_order_key(tiles);
    ASSERT_GE(k, last) << tiles;
    ASSERT_LT(k, cuda::kDecodeOrderBuckets) << tiles;
    last = k;
  }
  EXPECT_LT(cuda::decode_order_key(std::numeric_limits<int>::max()), cuda::kDecodeOrderBuckets);
  EXPECT_EQ(cuda::decode_order_key(8), cuda::decode_order_key(8));
  EXPECT_LT(cuda::decode_order_key(8), cuda::decode_order_key(9));    // eighths of an octave
  EXPECT_EQ(cuda::decode_order_key(64), cuda::decode_order_key(71));  // 64..71: one bucket
  EXPECT_LT(cuda::decode_order_key(71), cuda::decode_order_key(72));
  // Tiles 3, 1, 3, 0, 40, 1: the 40 first, the two 3s and the two 1s each in index order.
  EXPECT_EQ(cuda::decode_longest_first({3, 1, 3, 0, 40, 1}),
            (std::vector<int32_t>{4, 0, 2, 1, 5, 3}));
  const std::vector<int32_t> seq_len = {64, 65, 1, 0, 2047, 128};  // tiles 1, 2, 1, 0, 32, 2
  EXPECT_EQ(decode_order_longest_first(seq_len.data(), 6),
            (std::vector<int32_t>{4, 1, 5, 0, 2, 3}));
  EXPECT_TRUE(decode_order_longest_first(nullptr, 0).empty());
  EXPECT_THROW(decode_order_longest_first(nullptr, 2), Error);
}

// A decode launch's key holds every field in its own bits: packed and read back, each field is
// what went in, at the widest values the launcher gives them.
TEST(DecodeSplit, LaunchKeyFieldsRoundTrip) {
  for (const cuda::DecodeLaunchKey k :
       {cuda::DecodeLaunchKey{}, cuda::DecodeLaunchKey{1 << 20, 1, true, false, 8, 1},
        cuda::DecodeLaunchKey{4096, cuda::kDecodeMaxSplits, false, true, 2, 255},
        cuda::DecodeLaunchKey{64, 2, false, false, 63, 16},
        cuda::DecodeLaunchKey{1 << 20, 1, false, false, 2, 4, true},
        cuda::DecodeLaunchKey{1 << 20, 1, false, false, 2, 4, true, true},
        cuda::DecodeLaunchKey{(1 << 30) + 64, cuda::kDecodeMaxSplits, false, true, 2, 4, false,
                              true}}) {
    const cuda::DecodeLaunchKey r = cuda::DecodeLaunchKey::unpack(k.pack());
    EXPECT_EQ(r.split_tokens, k.split_tokens);
    EXPECT_EQ(r.num_splits, k.num_splits);
    EXPECT_EQ(r.persistent, k.persistent);
    EXPECT_EQ(r.cluster_merge, k.cluster_merge);
    EXPECT_EQ(r.kv_per_cta, k.kv_per_cta);
    EXPECT_EQ(r.head_chunks, k.head_chunks);
    EXPECT_EQ(r.ordered, k.ordered);
    EXPECT_EQ(r.gather_rows, k.gather_rows);
  }
  // The layout the CUDA graphs' keys were recorded with: splits in bits 16..31, persistent 15.
  const cuda::DecodeLaunchKey persistent3{0, 3, true, false, 0, 0};
  EXPECT_EQ(persistent3.pack(), (uint64_t{3} << 16) | (uint64_t{1} << 15));
}

}  // namespace
}  // namespace fp8kv
