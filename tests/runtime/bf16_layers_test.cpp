// --kv-bf16-layers: FP8 pools that keep chosen layers in bf16 (KvPool, ModelRunner, evaluate),
// the layer-list parser and the suggestion eval prints.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "fp8kv/backend.h"
#include "fp8kv/calib.h"
#include "fp8kv/error.h"
#include "fp8kv/kv_pool.h"
#include "fp8kv/make_model.h"
#include "fp8kv/model.h"
#include "fp8kv/scheme.h"
#include "fp8kv/workflows.h"
#include "runtime/test_util.h"

namespace fp8kv {
namespace {

bool has(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

TEST(LayerList, ParsesAndRefusesNamingTheEntry) {
  EXPECT_EQ(parse_layer_list("0,31", "--kv-bf16-layers"), (std::vector<int>{0, 31}));
  EXPECT_EQ(parse_layer_list("7", "--kv-bf16-layers"), (std::vector<int>{7}));
  for (const std::string bad : {"", "1,,2", "a", "-1", "1, 2", "3,", "99999999"}) {
    const std::string m = error_of([&] { parse_layer_list(bad, "--kv-bf16-layers"); });
    EXPECT_TRUE(has(m, "--kv-bf16-layers: expected comma-separated layer indices")) << bad << m;
  }
  EXPECT_TRUE(has(error_of([] { parse_layer_list("3,1,3", "--kv-bf16-layers"); }),
                  "layer 3 is given twice in '3,1,3'"));
}

TEST(SuggestBf16Layers, TheLayersWellAboveTheMedianLargestFirst) {
  EXPECT_EQ(suggest_bf16_layers({0.01, 0.01, 0.01, 0.05, 0.01, 0.01, 0.01, 0.01}),
            (std::vector<int>{3}));
  EXPECT_TRUE(suggest_bf16_layers({0.01, 0.015, 0.012, 0.019}).empty());  // none above 2x
  // Layers already in bf16 (error 0) are neither suggested nor part of the median.
  EXPECT_EQ(suggest_bf16_layers({0.0, 0.0, 0.0, 0.0, 0.0, 0.01, 0.01, 0.03}),
            (std::vector<int>{7}));
  // At most layers / 8: of 16 layers with four outliers, the two worst.
  std::vector<double> e(16, 0.01);
  e[2] = 0.05, e[9] = 0.08, e[11] = 0.06, e[15] = 0.04;
  EXPECT_EQ(suggest_bf16_layers(e), (std::vector<int>{9, 11}));
  EXPECT_TRUE(suggest_bf16_layers({}).empty());
}

TEST(KvPoolBf16Layers, ChosenLayersAreBf16AndOthersFp8) {
  auto backend = make_cpu_backend();
  KvPool pool(*backend, 4, 16, 2, 64, KvScheme::kFp8PerHead, {0, 3});
  EXPECT_EQ(pool.layer(0).scheme, KvScheme::kBf16);
  EXPECT_EQ(pool.layer(1).scheme, KvScheme::kFp8PerHead);
  EXPECT_EQ(pool.layer(3).scheme, KvScheme::kBf16);
  EXPECT_EQ(pool.scheme(), KvScheme::kFp8PerHead);
  const size_t per_layer_fp8 = 17 * 2 * 2 * 64;  // (slots + 1) x 2 x Hkv x D bytes
  EXPECT_EQ(pool.bytes(), 2 * per_layer_fp8 + 2 * 2 * per_layer_fp8);
  EXPECT_TRUE(has(error_of([&] { KvPool(*backend, 4, 16, 2, 64, KvScheme::kFp8PerHead, {4}); }),
                  "--kv-bf16-layers: layer 4, but the model has 4 layers (0..3)"));
}

class Bf16LayersRunner : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    make_model(dir_->path() + "/tiny", model_preset("tiny"));
    backend_ = make_cpu_backend().release();
    ops_ = make_cpu_model_ops().release();
    tiny_ = Model::load(dir_->path() + "/tiny", *backend_).release();
  }
  static void TearDownTestSuite() {
    delete tiny_;
    delete ops_;
    delete backend_;
    delete dir_;
  }
  static std::vector<int32_t> tokens(int n, int seed) {
    std::vector<int32_t> t;
    const int V = tiny_->config().vocab_size;
    for (int i = 0; i < n; ++i) t.push_back(static_cast<int32_t>((seed * 7919 + i * 104729) % V));
    return t;
  }
  // Calibrated once per kind for the suite (calibration is the slow part).
  static const RankScales& scales(QuantType qt) {
    static std::map<QuantType, RankScales> cache;
    auto it = cache.find(qt);
    if (it != cache.end()) return it->second;
    CalibrateOptions co;
    co.quant_type = qt;
    co.batch_size = 2;
    const TokenData data = {tokens(24, 1), tokens(17, 2)};
    return cache[qt] = slice_for_rank(calibrate(*tiny_, *backend_, *ops_, data, co).data, 1, 0);
  }
  // Prefill logits of a prompt, then a decode step's logits, appended.
  static std::vector<float> run(KvScheme scheme, const std::vector<int>& bf16_layers) {
    RunnerOptions o;
    o.scheme = scheme;
    o.num_slots = 128;
    o.max_requests = 2;
    o.max_len = 64;
    o.bf16_layers = bf16_layers;
    if (is_fp8(scheme)) {
      o.scales =
          scales(scheme == KvScheme::kFp8PerHead ? QuantType::kPerHead : QuantType::kPerTensor);
    }
    ModelRunner r(*tiny_, *backend_, *ops_, o);
    const int req = r.add_request();
    std::vector<float> out = r.forward({req}, {tokens(11, 5)}, LogitRows::kAll);
    for (int32_t t : {17}) {  // one decode step: the decode path, kept short on the CPU
      const std::vector<float> step = r.forward({req}, {{t}}, LogitRows::kLast);
      out.insert(out.end(), step.begin(), step.end());
    }
    return out;
  }
  static TempDir* dir_;
  static Backend* backend_;
  static ModelOps* ops_;
  static Model* tiny_;
};

TempDir* Bf16LayersRunner::dir_ = nullptr;
Backend* Bf16LayersRunner::backend_ = nullptr;
ModelOps* Bf16LayersRunner::ops_ = nullptr;
Model* Bf16LayersRunner::tiny_ = nullptr;

// Every layer in bf16 is the bf16 cache, bit for bit (prefill and decode); some layers in bf16
// lie between the two.
TEST_F(Bf16LayersRunner, AllLayersBf16IsTheBf16CacheExactly) {
  const std::vector<float> bf16 = run(KvScheme::kBf16, {});
  for (KvScheme scheme : {KvScheme::kFp8PerTensor, KvScheme::kFp8PerHead}) {
    const std::vector<float> all = run(scheme, {0, 1, 2, 3});
    ASSERT_EQ(all.size(), bf16.size());
    size_t differ = 0;
    for (size_t i = 0; i < all.size(); ++i) differ += all[i] != bf16[i];
    EXPECT_EQ(differ, 0u) << scheme_name(scheme);
    const std::vector<float> fp8 = run(scheme, {});
    const std::vector<float> some = run(scheme, {0, 2});
    double d_fp8 = 0, d_some = 0;
    for (size_t i = 0; i < bf16.size(); ++i) {
      d_fp8 += std::pow(static_cast<double>(fp8[i]) - bf16[i], 2);
      d_some += std::pow(static_cast<double>(some[i]) - bf16[i], 2);
    }
    EXPECT_GT(d_some, 0.0) << scheme_name(scheme);    // layers 1 and 3 still round K/V
    EXPECT_NE(d_some, d_fp8) << scheme_name(scheme);  // and 0, 2 no longer do
  }
}

// evaluate: the bf16 layers' attention error is 0 in both FP8 caches; the table says so and
// names the layers that lose most.
TEST_F(Bf16LayersRunner, EvalShowsZeroErrorThereAndSuggests) {
  const TokenData data = {tokens(12, 1), tokens(9, 2)};
  EvalOptions eo;
  eo.batch_size = 2;
  eo.bf16_layers = {1};
  const EvalResult r = evaluate(*tiny_, *backend_, *ops_, data, scales(QuantType::kPerTensor),
                                scales(QuantType::kPerHead), eo);
  for (int s = 1; s < 3; ++s) {
    const std::vector<double>& e = r.schemes[static_cast<size_t>(s)].attn_rel_error;
    EXPECT_EQ(e[1], 0.0);
    EXPECT_GT(e[0], 0.0);
    EXPECT_GT(e[3], 0.0);
  }
  const std::string table = format_eval_table(r);
  EXPECT_TRUE(has(table, "(--kv-bf16-layers 1: kept in bf16 in every FP8 cache")) << table;
  EXPECT_TRUE(has(table, "fp8-per-head: layers losing most ")) << table;
  EXPECT_TRUE(has(table, "fp8-per-tensor: layers losing most ")) << table;
}

}  // namespace
}  // namespace fp8kv
