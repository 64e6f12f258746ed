#include "fp8kv/scheme.h"

#include <gtest/gtest.h>

#include <iterator>

#include "fp8kv/calib.h"
#include "fp8kv/error.h"

namespace fp8kv {
namespace {

TEST(Scheme, ParseAndName) {
  for (KvScheme s : kAllSchemes) EXPECT_EQ(parse_scheme(scheme_name(s)), s);
  EXPECT_EQ(parse_scheme("per-head"), KvScheme::kFp8PerHead);
  EXPECT_EQ(parse_scheme("fp8-e5m2"), KvScheme::kFp8E5m2);
  EXPECT_EQ(parse_scheme("fp8-per-head-bf16q"), KvScheme::kFp8PerHeadBf16Q);
  EXPECT_EQ(kv_elem_bytes(KvScheme::kBf16), 2);
  EXPECT_EQ(kv_elem_bytes(KvScheme::kFp8PerHead), 1);
  try {
    parse_scheme("fp16");
    FAIL() << "fp16 accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'fp16'"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("fp8-e5m2"), std::string::npos);
  }
}

// Each scheme as its three choices: element codec, scale source, FP8 Q.
TEST(Scheme, Traits) {
  struct Row {
    KvScheme s;
    KvCodec codec;
    KvScaleSource scales;
    bool fp8_q;
    int elem_bytes;
  };
  const Row rows[] = {
      {KvScheme::kBf16, KvCodec::kBf16, KvScaleSource::kNone, false, 2},
      {KvScheme::kFp8PerTensor, KvCodec::kE4m3, KvScaleSource::kPerTensor, false, 1},
      {KvScheme::kFp8PerHead, KvCodec::kE4m3, KvScaleSource::kPerHead, true, 1},
      {KvScheme::kFp8E5m2, KvCodec::kE5m2, KvScaleSource::kNone, false, 1},
      {KvScheme::kFp8PerHeadBf16Q, KvCodec::kE4m3, KvScaleSource::kPerHead, false, 1},
  };
  ASSERT_EQ(std::size(rows), std::size(kAllSchemes));
  for (const Row& r : rows) {
    SCOPED_TRACE(scheme_name(r.s));
    EXPECT_EQ(kv_codec(r.s), r.codec);
    EXPECT_EQ(kv_scale_source(r.s), r.scales);
    EXPECT_EQ(fp8_q(r.s), r.fp8_q);
    EXPECT_EQ(kv_elem_bytes(r.s), r.elem_bytes);
    EXPECT_EQ(is_fp8(r.s), r.s != KvScheme::kBf16);
    EXPECT_EQ(has_kv_scales(r.s), r.scales != KvScaleSource::kNone);
    EXPECT_EQ(kv_scales_per_layer(r.s, 8),
              r.scales == KvScaleSource::kPerHead ? 8 : r.scales == KvScaleSource::kPerTensor);
  }
  EXPECT_EQ(calib_quant_type(KvScheme::kFp8PerHeadBf16Q), QuantType::kPerHead);
  EXPECT_EQ(calib_quant_type(KvScheme::kFp8PerTensor), QuantType::kPerTensor);
  EXPECT_FALSE(calib_quant_type(KvScheme::kFp8E5m2).has_value());
  EXPECT_FALSE(calib_quant_type(KvScheme::kBf16).has_value());
}

}  // namespace
}  // namespace fp8kv
