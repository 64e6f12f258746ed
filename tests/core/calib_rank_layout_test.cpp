// LightLLM's per-rank layout of kv_cache_calib.json (docs/FORMATS.md): loading (copies merged
// by max, refusals), writing (to_rank_layout) and the round trip between the two layouts. The
// lightllm_*.json fixtures are written the way LightLLM writes them
// (tests/data/calib/make_lightllm_fixtures.py: json.dump(..., indent=4) of float32 values).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "fp8kv/calib.h"
#include "fp8kv/error.h"

namespace fp8kv {
namespace {

const std::string kDataDir = std::string(FP8KV_SOURCE_DIR) + "/tests/data/calib/";

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "no fp8kv::Error thrown";
  return "";
}

CalibExpect kv_heads(int h) {
  CalibExpect e;
  e.num_kv_heads = h;
  return e;
}

// The abs-max the fixtures were made from (make_lightllm_fixtures.py, AMAX): per layer K h0,
// K h1, V h0, V h1. A scale is amax / 448 in float32, 1 where amax is 0.
float scale_of(float amax) { return amax > 0.0f ? amax / 448.0f : 1.0f; }
const float kAmax[2][4] = {{3.71f, 12.5f, 0.913f, 0.0f}, {7.25f, 2.0625f, 1.37f, 0.442f}};

CalibData per_head(int layers, int heads) {
  CalibData d;
  d.architectures = "LlamaForCausalLM";
  d.num_layers = layers;
  d.num_head = heads;
  for (int l = 0; l < layers; ++l) {
    for (int c = 0; c < 2 * heads; ++c) d.scales.push_back(0.001f * (1 + l * 2 * heads + c));
  }
  return d;
}

void expect_same_slices(const CalibData& a, const CalibData& b, int tp, const std::string& what) {
  for (int r = 0; r < tp; ++r) {
    const RankScales sa = slice_for_rank(a, tp, r), sb = slice_for_rank(b, tp, r);
    EXPECT_EQ(sa.heads_per_rank, sb.heads_per_rank) << what << " tp " << tp << " rank " << r;
    EXPECT_EQ(sa.kv, sb.kv) << what << " tp " << tp << " rank " << r;
  }
}

TEST(CalibRankLayout, LightLlmTp8FileMergesToTheModelsHeads) {
  const std::string path = kDataDir + "lightllm_tp8_kv2_per_head.json";
  const CalibData d = load_calib(path, kv_heads(2));
  ASSERT_EQ(d.num_head, 2);
  ASSERT_TRUE(d.rank_layout.has_value());
  EXPECT_EQ(d.rank_layout->copies, 4);
  EXPECT_EQ(d.rank_layout->file_num_head, 8);
  EXPECT_EQ(d.rank_layout->max_disagreement, 0.0f);
  EXPECT_EQ(d.rank_layout->worst_layer, -1);
  for (int l = 0; l < 2; ++l) {
    for (int h = 0; h < 2; ++h) {
      EXPECT_EQ(d.k_scale(l, h), scale_of(kAmax[l][h])) << "layer " << l << " head " << h;
      EXPECT_EQ(d.v_scale(l, h), scale_of(kAmax[l][2 + h])) << "layer " << l << " head " << h;
    }
  }
  // Read without the model's heads, the file is 8 heads as written: at tp 8 every rank gets
  // what LightLLM's loader gives it (column r of each half), the same as from the merged file.
  const CalibData raw = load_calib(path);
  EXPECT_EQ(raw.num_head, 8);
  EXPECT_FALSE(raw.rank_layout.has_value());
  EXPECT_EQ(apparent_rank_copies(raw), 4);
  EXPECT_EQ(apparent_rank_copies(d), 1);
  expect_same_slices(raw, d, 8, "raw vs merged");
  // Our writer puts the merged scales back into the very layout LightLLM wrote.
  const CalibData back = to_rank_layout(d, 8);
  EXPECT_EQ(back.num_head, 8);
  EXPECT_EQ(back.scales, raw.scales);
  EXPECT_FALSE(back.rank_layout.has_value());
}

TEST(CalibRankLayout, CopiesOneRoundingStepApartAreMergedByMax) {
  const CalibData d = load_calib(kDataDir + "lightllm_tp4_kv2_one_step.json", kv_heads(2));
  ASSERT_TRUE(d.rank_layout.has_value());
  EXPECT_EQ(d.rank_layout->copies, 2);
  const float s = scale_of(kAmax[1][2]);  // layer 1, V head 0: one copy is a step above
  const float up = std::nextafter(s, 1.0f);
  EXPECT_EQ(d.v_scale(1, 0), up);
  EXPECT_EQ(d.rank_layout->max_disagreement, up - s);
  EXPECT_EQ(d.rank_layout->worst_layer, 1);
  EXPECT_EQ(d.rank_layout->worst_column, 2);  // merged row [K h0, K h1, V h0, V h1]
  EXPECT_EQ(d.k_scale(0, 1), scale_of(kAmax[0][1]));
}

TEST(CalibRankLayout, DisagreeingCopiesAreRefusedNamingHeadAndValues) {
  const std::string path = kDataDir + "bad_lightllm_copies_disagree.json";
  std::string msg = error_of([&] { load_calib(path, kv_heads(2)); });
  for (const char* part :
       {"bad_lightllm_copies_disagree.json: field 'scales': layer 0, K scale of head 1",
        "its 4 copies (columns 4..7, LightLLM's per-rank layout of 2 KV heads over 8 ranks)",
        "more than a float32 rounding step", "(column 4)", "(column 6)"}) {
    EXPECT_NE(msg.find(part), std::string::npos) << "'" << part << "' not in: " << msg;
  }
  // Both values, as the shortest text that reads back as them.
  EXPECT_NE(msg.find("0.0279017"), std::string::npos) << msg;  // 12.5 / 448
  EXPECT_NE(msg.find("0.0284598"), std::string::npos) << msg;  // 12.75 / 448

  // The heads tiled [h0 h1 h0 h1] instead of in rank order [h0 h0 h1 h1].
  msg = error_of([&] { load_calib(kDataDir + "bad_lightllm_tiled_order.json", kv_heads(2)); });
  EXPECT_NE(msg.find("layer 0, K scale of head 0: its 2 copies (columns 0..1"), std::string::npos)
      << msg;
  // From memory the same.
  const CalibData raw = load_calib(kDataDir + "bad_lightllm_tiled_order.json");
  EXPECT_NE(error_of([&] { merge_rank_layout(raw, 2, "mem"); }).find("mem: field 'scales'"),
            std::string::npos);
}

TEST(CalibRankLayout, AnyOtherNumHeadIsStillRefused) {
  const std::string tp8 = kDataDir + "lightllm_tp8_kv2_per_head.json";
  for (int h : {3, 5, 16}) {
    const std::string msg = error_of([&] { load_calib(tp8, kv_heads(h)); });
    EXPECT_NE(msg.find("field 'num_head': expected " + std::to_string(h) +
                       " (the model's KV heads) or a multiple of it (LightLLM's per-rank "
                       "layout), found 8"),
              std::string::npos)
        << msg;
  }
  // 8 = 2 x 4 and 4 x 2: as 4 heads the copies (h0 h0 | h1 h1 pairs) also agree, so a model
  // with 4 KV heads reads it as written by 2 ranks per head -- the same per-rank scales at any
  // tp that model allows.
  const CalibData four = load_calib(tp8, kv_heads(4));
  EXPECT_EQ(four.rank_layout->copies, 2);
  EXPECT_EQ(four.num_head, 4);
}

TEST(CalibRankLayout, PerTensorFileFromManyRanksLoads) {
  // LightLLM's newer exporter writes num_head = heads per rank x ranks for per_tensor too.
  const CalibData d = load_calib(kDataDir + "lightllm_tp4_kv2_per_tensor.json", kv_heads(2));
  EXPECT_EQ(d.quant_type, QuantType::kPerTensor);
  EXPECT_EQ(d.num_head, 2);
  ASSERT_TRUE(d.rank_layout.has_value());
  EXPECT_EQ(d.rank_layout->copies, 4 / 2);
  EXPECT_EQ(d.k_scale(0, 0), scale_of(12.5f));
  EXPECT_EQ(d.v_scale(1, 0), scale_of(1.37f));
  EXPECT_EQ(to_rank_layout(d, 4).num_head, 4);
  EXPECT_EQ(to_rank_layout(d, 4).scales, d.scales);
}

// Both layouts of one set of scales load to the same per-rank scales at tp 1, 2, 4, 8 (through
// the JSON text, as a file would), for a model with 2 KV heads (ranks outnumber heads from
// tp 4 on) and one with 8 (the two layouts are the same file at every tp here).
TEST(CalibRankLayout, BothLayoutsLoadToTheSameRankScales) {
  for (int heads : {2, 8}) {
    const CalibData merged = per_head(3, heads);
    for (int tp : {1, 2, 4, 8}) {
      const CalibData rank_file = to_rank_layout(merged, tp);
      EXPECT_EQ(rank_file.num_head, std::max(heads, tp)) << "heads " << heads << " tp " << tp;
      if (tp <= heads) {
        EXPECT_EQ(rank_file.scales, merged.scales);
      }
      const CalibData a = parse_calib(calib_to_json(merged), "merged.json", kv_heads(heads));
      const CalibData b = parse_calib(calib_to_json(rank_file), "rank.json", kv_heads(heads));
      EXPECT_EQ(b.num_head, heads);
      EXPECT_EQ(b.scales, merged.scales) << "heads " << heads << " tp " << tp;
      expect_same_slices(a, b, tp, "heads " + std::to_string(heads));
      // LightLLM's own reading of its per-rank file at that tp: rank r takes columns
      // [r*h, (r+1)*h) of each half, as written.
      const CalibData raw = parse_calib(calib_to_json(rank_file), "rank.json");
      expect_same_slices(raw, a, tp, "raw, heads " + std::to_string(heads));
    }
  }
  EXPECT_NE(error_of([] {
              to_rank_layout(per_head(1, 2), 3);
            }).find("tensor parallel size 3 and num_head 2"),
            std::string::npos);
}

}  // namespace
}  // namespace fp8kv
