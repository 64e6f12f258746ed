#include "fp8kv/scheme.h"

#include <gtest/gtest.h>

#include "fp8kv/error.h"

namespace fp8kv {
namespace {

TEST(Scheme, ParseAndName) {
  for (KvScheme s : {KvScheme::kBf16, KvScheme::kFp8PerTensor, KvScheme::kFp8PerHead}) {
    EXPECT_EQ(parse_scheme(scheme_name(s)), s);
  }
  EXPECT_EQ(parse_scheme("per-head"), KvScheme::kFp8PerHead);
  EXPECT_EQ(kv_elem_bytes(KvScheme::kBf16), 2);
  EXPECT_EQ(kv_elem_bytes(KvScheme::kFp8PerHead), 1);
  try {
    parse_scheme("fp16");
    FAIL() << "fp16 accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'fp16'"), std::string::npos);
  }
}

}  // namespace
}  // namespace fp8kv
