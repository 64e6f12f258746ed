#include "fp8kv/calib.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "fp8kv/error.h"

namespace fp8kv {
namespace {

namespace fs = std::filesystem;

const std::string kDataDir = std::string(FP8KV_SOURCE_DIR) + "/tests/data/calib/";
const std::string kLightLlmFile =
    std::string(FP8KV_SOURCE_DIR) + "/examples/lightllm_per_tensor_qwen2.5_32b.json";

uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

float float_of_bits(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

std::string read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::vector<std::string> entries_of(const fs::path& dir) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

// The message of the Error that `f` throws ("" and a test failure when it throws none).
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "no fp8kv::Error thrown";
  return "";
}

// A fresh empty directory per test, removed afterwards.
class CalibFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() /
           ("fp8kv_calib_" + std::to_string(::getpid()) + "_" + info->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override {
    std::error_code ec;
    fs::permissions(dir_, fs::perms::owner_all, fs::perm_options::add, ec);
    fs::remove_all(dir_, ec);
  }
  fs::path dir_;
};

// Random positive finite float32 scales (any bit pattern: subnormals, tiny, huge), [rows, cols].
std::vector<float> random_scales(std::mt19937& rng, size_t count) {
  std::uniform_int_distribution<uint32_t> dist(1, bits_of(std::numeric_limits<float>::max()));
  std::vector<float> out(count);
  for (float& x : out) x = float_of_bits(dist(rng));
  return out;
}

CalibData make_per_head(int layers, int heads) {
  CalibData d;
  d.architectures = "LlamaForCausalLM";
  d.quant_type = QuantType::kPerHead;
  d.num_layers = layers;
  d.num_head = heads;
  d.scales.resize(static_cast<size_t>(layers) * 2 * heads);  // [layers, 2 * heads]
  for (int l = 0; l < layers; ++l) {
    for (int h = 0; h < heads; ++h) {
      // K of head h = (l + 1) + h / 100, V = -(that): easy to tell apart in the slices.
      d.scales[static_cast<size_t>(l) * 2 * heads + h] = (l + 1) + h / 100.0f;
      d.scales[static_cast<size_t>(l) * 2 * heads + heads + h] = 100 + (l + 1) + h / 100.0f;
    }
  }
  return d;
}

void expect_same(const CalibData& a, const CalibData& b) {
  EXPECT_EQ(a.version, b.version);
  EXPECT_EQ(a.architectures, b.architectures);
  EXPECT_EQ(a.quant_type, b.quant_type);
  EXPECT_EQ(bits_of(a.qmin), bits_of(b.qmin));
  EXPECT_EQ(bits_of(a.qmax), bits_of(b.qmax));
  EXPECT_EQ(a.num_layers, b.num_layers);
  EXPECT_EQ(a.num_head, b.num_head);
  EXPECT_EQ(a.num_target_layers, b.num_target_layers);
  EXPECT_EQ(a.num_draft_layers, b.num_draft_layers);
  ASSERT_EQ(a.scales.size(), b.scales.size());
  for (size_t i = 0; i < a.scales.size(); ++i) {
    ASSERT_EQ(bits_of(a.scales[i]), bits_of(b.scales[i]))
        << "scale " << i << ": " << a.scales[i] << " vs " << b.scales[i];
  }
  ASSERT_EQ(a.q_scales.has_value(), b.q_scales.has_value());
  if (a.q_scales) {
    EXPECT_EQ(a.q_scales->num_head, b.q_scales->num_head);
    ASSERT_EQ(a.q_scales->scales.size(), b.q_scales->scales.size());
    for (size_t i = 0; i < a.q_scales->scales.size(); ++i) {
      ASSERT_EQ(bits_of(a.q_scales->scales[i]), bits_of(b.q_scales->scales[i])) << "q " << i;
    }
  }
}

// ---- round trip ------------------------------------------------------------------------------

TEST_F(CalibFileTest, RandomFloat32RoundTripsBitExact) {
  std::mt19937 rng(1234);
  CalibData d = make_per_head(/*layers=*/61, /*heads=*/16);
  d.scales = random_scales(rng, d.scales.size());
  d.num_target_layers = 60;
  d.num_draft_layers = 1;
  d.q_scales = QScales{16, random_scales(rng, static_cast<size_t>(61) * 16)};
  // The extremes: smallest subnormal, smallest normal, largest finite.
  d.scales[0] = float_of_bits(1);
  d.scales[1] = std::numeric_limits<float>::min();
  d.scales[2] = std::numeric_limits<float>::max();

  const std::string path = (dir_ / "kv_cache_calib.json").string();
  write_calib(path, d);
  expect_same(d, load_calib(path));
  EXPECT_EQ(entries_of(dir_), std::vector<std::string>{"kv_cache_calib.json"});

  // Many more values through the in-memory path (no file system).
  CalibData big = make_per_head(/*layers=*/100, /*heads=*/128);
  big.scales = random_scales(rng, big.scales.size());
  expect_same(big, parse_calib(calib_to_json(big), "big.json"));
  // Per tensor as well.
  CalibData pt;
  pt.architectures = "Qwen2ForCausalLM";
  pt.quant_type = QuantType::kPerTensor;
  pt.num_layers = 500;
  pt.num_head = 8;
  pt.scales = random_scales(rng, 1000);
  expect_same(pt, parse_calib(calib_to_json(pt), "pt.json"));
}

TEST(Calib, JsonLooksLikeTheFormatsExample) {
  CalibData d = make_per_head(2, 2);
  d.scales = {0.031f, 0.047f, 0.0062f, 0.0091f, 0.052f, 0.038f, 0.011f, 0.0087f};
  const std::string text = calib_to_json(d);
  EXPECT_NE(text.find("\"qmin\": -448.0,"), std::string::npos) << text;
  EXPECT_NE(text.find("\"qmax\": 448.0,"), std::string::npos) << text;
  EXPECT_NE(text.find("\"scales_shape\": [2, 4],"), std::string::npos) << text;
  EXPECT_NE(text.find("[0.031, 0.047, 0.0062, 0.0091],\n"), std::string::npos) << text;
  EXPECT_NE(text.find("\"quant_type\": \"per_head\""), std::string::npos) << text;
}

TEST(Calib, Accessors) {
  const CalibData d = make_per_head(3, 4);
  EXPECT_EQ(d.row_width(), 8);
  EXPECT_EQ(d.k_scale(2, 3), 3.03f);
  EXPECT_EQ(d.v_scale(2, 3), 103.03f);
  EXPECT_THROW(d.k_scale(3, 0), Error);
  EXPECT_THROW(d.v_scale(0, 4), Error);
  EXPECT_STREQ(quant_type_name(QuantType::kPerHead), "per_head");
  EXPECT_STREQ(quant_type_name(QuantType::kPerTensor), "per_tensor");
}

// ---- LightLLM's file ------------------------------------------------------------------------

TEST_F(CalibFileTest, LightLlmFileLoadsAndRewritesTheSame) {
  CalibExpect expect;
  expect.architectures = "Qwen2ForCausalLM";
  expect.num_layers = 64;
  expect.num_kv_heads = 8;
  expect.quant_type = QuantType::kPerTensor;
  const CalibData d = load_calib(kLightLlmFile, expect);
  EXPECT_EQ(d.architectures, "Qwen2ForCausalLM");
  EXPECT_EQ(d.quant_type, QuantType::kPerTensor);
  EXPECT_EQ(d.num_layers, 64);
  EXPECT_EQ(d.num_head, 8);
  EXPECT_EQ(d.row_width(), 2);
  ASSERT_EQ(d.scales.size(), 128u);
  // The file's first row, written by Python as doubles, rounded once to float.
  EXPECT_EQ(d.k_scale(0, 0), static_cast<float>(0.0571986623108387));
  EXPECT_EQ(d.v_scale(0, 5), static_cast<float>(0.0210658498108387));
  EXPECT_EQ(d.v_scale(63, 0), 0.078125f);

  const std::string path = (dir_ / "rewritten.json").string();
  write_calib(path, d);
  expect_same(d, load_calib(path, expect));
  // Asked for by a per-head scheme, the per_tensor file loads as it is (scales_for_scheme
  // broadcasts it; CalibBroadcast below).
  expect.quant_type = QuantType::kPerHead;
  expect_same(d, load_calib(kLightLlmFile, expect));
}

// ---- tensor parallelism ---------------------------------------------------------------------

TEST(CalibSlice, PerHeadDividesHeads) {
  const CalibData d = make_per_head(/*layers=*/3, /*heads=*/8);
  for (int tp : {1, 2, 4, 8}) {
    const int h = 8 / tp;
    for (int rank = 0; rank < tp; ++rank) {
      const RankScales s = slice_for_rank(d, tp, rank);
      EXPECT_EQ(s.heads_per_rank, h);
      EXPECT_EQ(s.num_layers, 3);
      ASSERT_EQ(s.kv.size(), static_cast<size_t>(3 * 2 * h));
      EXPECT_FALSE(s.q.has_value());
      for (int l = 0; l < 3; ++l) {
        for (int j = 0; j < h; ++j) {
          EXPECT_EQ(s.k_row(l)[j], d.k_scale(l, rank * h + j)) << tp << " " << rank;
          EXPECT_EQ(s.v_row(l)[j], d.v_scale(l, rank * h + j)) << tp << " " << rank;
        }
      }
    }
  }
}

TEST(CalibSlice, MoreRanksThanHeadsReplicates) {
  const CalibData d = make_per_head(/*layers=*/2, /*heads=*/8);
  const int tp = 16;  // f = 2: ranks 2g and 2g+1 both hold head g
  for (int rank = 0; rank < tp; ++rank) {
    const RankScales s = slice_for_rank(d, tp, rank);
    ASSERT_EQ(s.heads_per_rank, 1);
    for (int l = 0; l < 2; ++l) {
      EXPECT_EQ(s.k_row(l)[0], d.k_scale(l, rank / 2));
      EXPECT_EQ(s.v_row(l)[0], d.v_scale(l, rank / 2));
    }
  }
  // H = 2, tp = 8: f = 4.
  const CalibData two = make_per_head(1, 2);
  EXPECT_EQ(slice_for_rank(two, 8, 3).k_row(0)[0], two.k_scale(0, 0));
  EXPECT_EQ(slice_for_rank(two, 8, 4).k_row(0)[0], two.k_scale(0, 1));
}

TEST(CalibSlice, Refusals) {
  const CalibData three = make_per_head(1, 3);
  std::string msg = error_of([&] { slice_for_rank(three, 2, 0); });
  EXPECT_NE(msg.find("tensor parallel size 2 and num_head 3"), std::string::npos) << msg;
  const CalibData eight = make_per_head(1, 8);
  EXPECT_NE(error_of([&] { slice_for_rank(eight, 3, 0); }).find("num_head 8"), std::string::npos);
  EXPECT_NE(error_of([&] { slice_for_rank(eight, 0, 0); }).find("found 0"), std::string::npos);
  msg = error_of([&] { slice_for_rank(eight, 2, 2); });
  EXPECT_NE(msg.find("0 <= rank < 2"), std::string::npos) << msg;
  EXPECT_NE(msg.find("found 2"), std::string::npos) << msg;
  EXPECT_THROW(slice_for_rank(eight, 2, -1), Error);
}

TEST(CalibSlice, PerTensorIsTheSameForEveryRank) {
  const CalibData d = load_calib(kLightLlmFile);
  for (int tp : {1, 2, 4, 8, 16}) {
    for (int rank = 0; rank < tp; ++rank) {
      const RankScales s = slice_for_rank(d, tp, rank);
      EXPECT_EQ(s.quant_type, QuantType::kPerTensor);
      EXPECT_EQ(s.heads_per_rank, std::max(1, 8 / tp));
      EXPECT_EQ(s.row_width(), 2);
      EXPECT_EQ(s.kv, d.scales);
      EXPECT_EQ(s.k_row(5)[0], d.k_scale(5, 0));
      EXPECT_EQ(s.v_row(5)[0], d.v_scale(5, 0));
    }
  }
  EXPECT_THROW(slice_for_rank(d, 3, 0), Error);  // 3 and 8: neither divides the other
}

// ---- a per_tensor file for the per-head schemes ---------------------------------------------

// Every KV head of a layer gets the layer's K scale, V likewise, bit for bit; at every tp the
// rank's heads are those of the broadcast file, and its per_head file slices the same way.
TEST(CalibBroadcast, PerTensorFileServesThePerHeadSchemes) {
  CalibExpect expect;
  expect.num_kv_heads = 8;
  expect.quant_type = calib_quant_type(KvScheme::kFp8PerHead);
  const CalibData pt = load_calib(kLightLlmFile, expect);  // 64 layers, 8 KV heads
  ASSERT_EQ(pt.quant_type, QuantType::kPerTensor);
  const CalibData ph = broadcast_to_per_head(pt);
  EXPECT_EQ(ph.quant_type, QuantType::kPerHead);
  EXPECT_EQ(ph.num_head, 8);
  ASSERT_EQ(ph.scales.size(), static_cast<size_t>(64 * 2 * 8));
  for (int l = 0; l < 64; ++l) {
    for (int h = 0; h < 8; ++h) {
      EXPECT_EQ(bits_of(ph.k_scale(l, h)), bits_of(pt.k_scale(l, 0))) << l << " " << h;
      EXPECT_EQ(bits_of(ph.v_scale(l, h)), bits_of(pt.v_scale(l, 0))) << l << " " << h;
    }
  }
  EXPECT_EQ(broadcast_to_per_head(ph).scales, ph.scales);  // per_head stays as it is
  for (KvScheme scheme : {KvScheme::kFp8PerHead, KvScheme::kFp8PerHeadBf16Q}) {
    for (int tp : {1, 2, 16}) {  // 16: each head replicated on two ranks
      for (int rank = 0; rank < tp; ++rank) {
        const RankScales s = scales_for_scheme(pt, scheme, tp, rank);
        EXPECT_EQ(s.quant_type, QuantType::kPerHead);
        EXPECT_TRUE(s.broadcast_from_per_tensor);
        EXPECT_EQ(s.heads_per_rank, std::max(1, 8 / tp));
        EXPECT_EQ(s.kv, slice_for_rank(ph, tp, rank).kv) << scheme_name(scheme) << " tp " << tp;
        for (int j = 0; j < s.heads_per_rank; ++j) {
          EXPECT_EQ(s.k_row(63)[j], pt.k_scale(63, 0));
          EXPECT_EQ(s.v_row(63)[j], pt.v_scale(63, 0));
        }
      }
    }
  }
  // fp8-per-tensor takes the file as it is.
  const RankScales same = scales_for_scheme(pt, KvScheme::kFp8PerTensor, 2, 1);
  EXPECT_EQ(same.quant_type, QuantType::kPerTensor);
  EXPECT_FALSE(same.broadcast_from_per_tensor);
  EXPECT_EQ(same.kv, pt.scales);
  // A per_head file for fp8-per-head is not marked.
  EXPECT_FALSE(scales_for_scheme(ph, KvScheme::kFp8PerHead, 1, 0).broadcast_from_per_tensor);
}

// The reverse needs a reduction (lossy for the smaller heads): refused, naming quant_type and the
// command that makes it; a scheme without scales refuses any; no heads to broadcast to, refused.
TEST(CalibBroadcast, PerHeadFileForFp8PerTensorStaysRefused) {
  const std::string ok = kDataDir + "ok_per_head.json";
  CalibExpect expect;
  expect.quant_type = calib_quant_type(KvScheme::kFp8PerTensor);
  std::string msg = error_of([&] { load_calib(ok, expect); });
  EXPECT_NE(msg.find("ok_per_head.json: field 'quant_type': expected \"per_tensor\" (the scheme "
                     "fp8-per-tensor), found \"per_head\""),
            std::string::npos)
      << msg;
  EXPECT_NE(msg.find("`fp8kv convert " + ok + " OUT --to lightllm --reduce max`"),
            std::string::npos)
      << msg;
  const CalibData ph = load_calib(ok);
  msg = error_of([&] { scales_for_scheme(ph, KvScheme::kFp8PerTensor, 1, 0); });
  EXPECT_NE(msg.find("fp8-per-tensor KV cache needs per_tensor scales, got per_head"),
            std::string::npos)
      << msg;
  EXPECT_NE(msg.find("--reduce max"), std::string::npos) << msg;
  msg = error_of([&] { scales_for_scheme(ph, KvScheme::kFp8E5m2, 1, 0); });
  EXPECT_NE(msg.find("fp8-e5m2 KV cache takes no calibration file"), std::string::npos) << msg;
  CalibData no_heads = load_calib(kLightLlmFile);
  no_heads.num_head = 0;  // as a quant-param JSON read without the model
  msg = error_of([&] { scales_for_scheme(no_heads, KvScheme::kFp8PerHead, 1, 0); });
  EXPECT_NE(msg.find("num_head: expected >= 1 (the model's KV heads), found 0"), std::string::npos)
      << msg;
}

TEST(CalibSlice, QCalibrationFollowsTheKvHeads) {
  CalibData d = make_per_head(/*layers=*/2, /*heads=*/4);
  QScales q;
  q.num_head = 4;
  q.scales = {1, 2, 3, 4, 5, 6, 7, 8};  // [2, 4]
  d.q_scales = q;
  // tp = 2: rank 1 holds heads 2, 3.
  RankScales s = slice_for_rank(d, 2, 1);
  ASSERT_TRUE(s.q.has_value());
  EXPECT_EQ(*s.q, (std::vector<float>{3, 4, 7, 8}));  // [2, 2]
  // tp = 8: f = 2, rank 5 holds head 2.
  s = slice_for_rank(d, 8, 5);
  EXPECT_EQ(*s.q, (std::vector<float>{3, 7}));
  // Q scales for 2 groups with 4 KV heads at tp = 4: repeated by 4 * 1 / 2 = 2.
  d.q_scales->num_head = 2;
  d.q_scales->scales = {1, 2, 3, 4};  // [2, 2]
  s = slice_for_rank(d, 4, 3);
  EXPECT_EQ(*s.q, (std::vector<float>{2, 4}));
  // 3 Q-scale heads cannot be spread over tp * h = 4.
  d.q_scales->num_head = 3;
  d.q_scales->scales = {1, 2, 3, 4, 5, 6};
  const std::string msg = error_of([&] { slice_for_rank(d, 4, 0); });
  EXPECT_NE(msg.find("q_calibration.num_head 3"), std::string::npos) << msg;
}

// ---- atomic write ---------------------------------------------------------------------------

TEST_F(CalibFileTest, WriteReplacesAnExistingFile) {
  const std::string path = (dir_ / "kv_cache_calib.json").string();
  { std::ofstream(path) << "old content"; }
  const CalibData d = make_per_head(2, 2);
  write_calib(path, d);
  expect_same(d, load_calib(path));
  EXPECT_EQ(entries_of(dir_), std::vector<std::string>{"kv_cache_calib.json"});
}

TEST_F(CalibFileTest, FailedWriteLeavesTheOldFileIntact) {
  const std::string path = (dir_ / "kv_cache_calib.json").string();
  const CalibData old_data = make_per_head(2, 2);
  write_calib(path, old_data);
  const std::string old_bytes = read_all(path);

  // A NaN (or non-positive) scale is refused before anything is written.
  CalibData bad = make_per_head(2, 2);
  bad.scales[5] = std::nanf("");
  std::string msg = error_of([&] { write_calib(path, bad); });
  EXPECT_NE(msg.find("layer 1, column 1 (K scale of head 1)"), std::string::npos) << msg;
  EXPECT_NE(msg.find("found nan"), std::string::npos) << msg;
  bad.scales[5] = -1.0f;
  EXPECT_THROW(write_calib(path, bad), Error);
  // Inconsistent sizes too.
  bad = make_per_head(2, 2);
  bad.scales.pop_back();
  msg = error_of([&] { write_calib(path, bad); });
  EXPECT_NE(msg.find("expected 8 values"), std::string::npos) << msg;
  EXPECT_EQ(read_all(path), old_bytes);
  EXPECT_EQ(entries_of(dir_), std::vector<std::string>{"kv_cache_calib.json"});

  // A folder that does not exist.
  msg = error_of([&] { write_calib((dir_ / "missing" / "kv.json").string(), old_data); });
  EXPECT_NE(msg.find("cannot create temporary file"), std::string::npos) << msg;

  // A folder we cannot write into (root ignores permissions, so only as a normal user).
  if (::geteuid() != 0) {
    fs::permissions(dir_, fs::perms::owner_read | fs::perms::owner_exec);
    msg = error_of([&] { write_calib(path, make_per_head(3, 3)); });
    EXPECT_NE(msg.find("cannot create temporary file"), std::string::npos) << msg;
    fs::permissions(dir_, fs::perms::owner_all);
  }
  // The target is a folder: the temp file is written, the rename fails, the temp is removed.
  const fs::path folder = dir_ / "a_folder";
  fs::create_directories(folder / "inside");
  msg = error_of([&] { write_calib(folder.string(), old_data); });
  EXPECT_NE(msg.find("cannot rename"), std::string::npos) << msg;
  fs::remove_all(folder);

  EXPECT_EQ(read_all(path), old_bytes);
  EXPECT_EQ(entries_of(dir_), std::vector<std::string>{"kv_cache_calib.json"});
}

// ---- loading refusals -----------------------------------------------------------------------

TEST_F(CalibFileTest, MissingOrOversizedFile) {
  std::string msg = error_of([&] { load_calib((dir_ / "nope.json").string()); });
  EXPECT_NE(msg.find("nope.json: cannot open calibration file"), std::string::npos) << msg;
  msg = error_of([&] { load_calib(dir_.string()); });
  EXPECT_NE(msg.find("directory"), std::string::npos) << msg;

  // A sparse file of 64 MiB + 1 byte: refused from its size, without reading it.
  const fs::path big = dir_ / "big.json";
  std::ofstream(big).put('{');
  fs::resize_file(big, (uint64_t{64} << 20) + 1);
  msg = error_of([&] { load_calib(big.string()); });
  EXPECT_NE(msg.find("big.json: 67108865 bytes, larger than the 67108864-byte limit"),
            std::string::npos)
      << msg;
}

struct BadFileCase {
  const char* file;                     // in tests/data/calib/
  std::vector<const char*> substrings;  // each must appear in the message
};

void PrintTo(const BadFileCase& c, std::ostream* os) { *os << c.file; }

class MalformedCalibTest : public ::testing::TestWithParam<BadFileCase> {};

TEST_P(MalformedCalibTest, RefusedWithAClearMessage) {
  const BadFileCase& c = GetParam();
  const std::string path = kDataDir + c.file;
  ASSERT_TRUE(fs::exists(path)) << path;
  const std::string msg = error_of([&] { load_calib(path); });
  EXPECT_NE(msg.find(c.file), std::string::npos) << "message does not name the file: " << msg;
  for (const char* s : c.substrings) {
    EXPECT_NE(msg.find(s), std::string::npos) << "'" << s << "' not in: " << msg;
  }
  // The same text from memory is refused the same way.
  const std::string again = error_of([&] { parse_calib(read_all(path), path); });
  EXPECT_EQ(again, msg);
}

INSTANTIATE_TEST_SUITE_P(
    Files, MalformedCalibTest,
    ::testing::Values(
        BadFileCase{"bad_empty.json", {"invalid JSON", "empty"}},
        BadFileCase{"bad_truncated.json", {"invalid JSON at line", "byte"}},
        BadFileCase{"bad_deep_nesting.json", {"nested deeper than 64 levels", "column 65"}},
        BadFileCase{"bad_huge_number.json", {"not finite", "1e999"}},
        BadFileCase{"bad_nan_literal.json", {"non-finite number 'NaN' at line 18"}},
        BadFileCase{"bad_trailing_garbage.json", {"invalid JSON at line"}},
        BadFileCase{"bad_top_level_array.json", {"expected a JSON object", "[1,2]"}},
        BadFileCase{"bad_missing_scales.json", {"missing field 'scales'"}},
        BadFileCase{"bad_missing_architectures.json", {"missing field 'architectures'"}},
        BadFileCase{"bad_num_layers_string.json",
                    {"field 'num_layers': expected an integer, found a string \"2\""}},
        BadFileCase{"bad_num_head_float.json",
                    {"field 'num_head': expected an integer, found 2.0"}},
        BadFileCase{"bad_num_layers_out_of_range.json",
                    {"field 'num_layers': expected an integer in int range, found 99999999999"}},
        BadFileCase{"bad_num_head_zero.json",
                    {"field 'num_head': expected an integer >= 1, found 0"}},
        BadFileCase{"bad_quant_type_unknown.json",
                    {"field 'quant_type': expected \"per_head\" or \"per_tensor\"",
                     "found \"per_channel\""}},
        BadFileCase{"bad_version.json", {"field 'version': expected \"1.0\", found \"2.0\""}},
        BadFileCase{"bad_scales_shape_mismatch.json",
                    {"field 'scales_shape': expected [2, 4]", "found [2, 3]"}},
        BadFileCase{"bad_scales_shape_per_tensor.json",
                    {"field 'scales_shape': expected [2, 2] (per_tensor", "found [2, 4]"}},
        BadFileCase{"bad_scales_shape_type.json", {"field 'scales_shape': expected [int, int]"}},
        BadFileCase{"bad_scales_row_count.json", {"field 'scales': expected 2 rows", "found 1"}},
        BadFileCase{"bad_scales_row_length.json",
                    {"field 'scales': row 1: expected 4 values", "found 3"}},
        BadFileCase{"bad_scale_string.json",
                    {"field 'scales': row 0, column 1: expected a number, found a string"}},
        BadFileCase{"bad_scale_zero.json",
                    {"field 'scales': layer 1, column 2 (V scale of head 0)",
                     "expected a finite value > 0, found 0"}},
        BadFileCase{"bad_scale_negative.json",
                    {"layer 0, column 1 (K scale of head 1)", "found -0.047"}},
        BadFileCase{"bad_scale_float_overflow.json",
                    {"field 'scales': layer 0, column 3", "found 1e+300 (not finite as float32)"}},
        BadFileCase{"bad_qmax.json", {"field 'qmax': expected 448.0", "found 57344"}},
        BadFileCase{"bad_qmin.json", {"field 'qmin': expected -448.0", "found 0"}},
        BadFileCase{"bad_draft_sum.json",
                    {"num_target_layers + num_draft_layers = 2 + 1 = 3", "found 2"}},
        BadFileCase{"bad_draft_alone.json",
                    {"'num_target_layers': expected together with 'num_draft_layers'"}},
        BadFileCase{"bad_q_calibration_shape.json",
                    {"field 'q_calibration.scales_shape': expected [2, 2]", "found [2, 3]"}},
        BadFileCase{"bad_q_calibration_scale.json",
                    {"field 'q_calibration.scales': layer 1, column 0 (Q scale of head 0)",
                     "found -0.125"}},
        BadFileCase{"bad_q_calibration_not_object.json",
                    {"field 'q_calibration': expected an object, found"}},
        BadFileCase{"bad_q_calibration_num_head_zero.json",
                    {"field 'q_calibration.num_head': expected an integer >= 1, found 0"}},
        BadFileCase{"bad_q_calibration_missing_scales.json",
                    {"missing field 'q_calibration.scales'"}},
        BadFileCase{"bad_q_calibration_per_tensor.json",
                    {"field 'q_calibration': static Q scales belong to a per_head file",
                     "quant_type \"per_tensor\""}}),
    [](const ::testing::TestParamInfo<BadFileCase>& info) {
      std::string name = info.param.file;
      name = name.substr(0, name.find('.'));
      return name;
    });

// A valid file checked against the wrong model or scheme.
struct MismatchCase {
  const char* label;
  CalibExpect expect;
  const char* message;
};

TEST(Calib, ExpectationMismatches) {
  const std::string ok = kDataDir + "ok_per_head.json";
  CalibExpect arch, layers, heads, scheme;
  arch.architectures = "Qwen2ForCausalLM";
  layers.num_layers = 32;
  heads.num_kv_heads = 8;
  scheme.quant_type = QuantType::kPerTensor;
  const MismatchCase cases[] = {
      {"arch", arch,
       "ok_per_head.json: field 'architectures': expected \"Qwen2ForCausalLM\" (the model's), "
       "found \"LlamaForCausalLM\""},
      {"layers", layers, "field 'num_layers': expected 32 (the model's layers), found 2"},
      {"heads", heads,
       "ok_per_head.json: field 'num_head': expected 8 (the model's KV heads) or a multiple "
       "of it (LightLLM's per-rank layout), found 2"},
      {"scheme", scheme,
       "field 'quant_type': expected \"per_tensor\" (the scheme fp8-per-tensor), found "
       "\"per_head\""},
  };
  for (const MismatchCase& c : cases) {
    const std::string msg = error_of([&] { load_calib(ok, c.expect); });
    EXPECT_NE(msg.find(c.message), std::string::npos) << c.label << ": " << msg;
  }
  // The matching expectations pass.
  CalibExpect all;
  all.architectures = "LlamaForCausalLM";
  all.num_layers = 2;
  all.num_kv_heads = 2;
  all.quant_type = QuantType::kPerHead;
  const CalibData d = load_calib(ok, all);
  EXPECT_EQ(d.k_scale(1, 0), 0.052f);
  EXPECT_EQ(d.v_scale(1, 1), 0.0087f);
}

TEST(Calib, DraftLayersAreCheckedAgainstTheTargetModel) {
  const std::string path = kDataDir + "ok_per_head_draft.json";
  CalibExpect expect;
  expect.num_layers = 2;  // the target model's layers, not the file's 3 rows
  const CalibData d = load_calib(path, expect);
  EXPECT_EQ(d.num_layers, 3);
  EXPECT_EQ(d.num_target_layers, 2);
  EXPECT_EQ(d.num_draft_layers, 1);
  expect.num_layers = 3;
  const std::string msg = error_of([&] { load_calib(path, expect); });
  EXPECT_NE(msg.find("field 'num_target_layers': expected 3 (the model's layers), found 2"),
            std::string::npos)
      << msg;
}

TEST(Calib, QCalibrationLoads) {
  const CalibData d = load_calib(kDataDir + "ok_per_head_q.json");
  ASSERT_TRUE(d.q_scales.has_value());
  EXPECT_EQ(d.q_scales->num_head, 2);
  EXPECT_EQ(d.q_scales->scales, (std::vector<float>{0.5f, 0.25f, 0.125f, 0.75f}));
  expect_same(d, parse_calib(calib_to_json(d), "again.json"));
}

// q_calibration against the model's KV heads: H, a divisor of H, or LightLLM's per-rank k x H
// (copies merged by max: each rank saw its own part of the group); anything else refused.
TEST(Calib, QCalibrationNumHeadAgainstTheModel) {
  CalibExpect two;
  two.num_kv_heads = 2;
  // LightLLM's per-rank layout (tp 4 over 2 KV heads) with the extra fields its newer
  // q_calibration carries (tensor, scale_layout, calibration_stage, header copies): ignored.
  const CalibData lightllm = load_calib(kDataDir + "ok_lightllm_q_rank_layout.json", two);
  EXPECT_EQ(lightllm.num_head, 2);
  ASSERT_TRUE(lightllm.q_scales.has_value());
  EXPECT_EQ(lightllm.q_scales->num_head, 2);
  EXPECT_EQ(lightllm.q_scales->scales, (std::vector<float>{0.5f, 0.25f, 0.125f, 0.75f}));
  // Without the model's heads it stays as written.
  const CalibData as_written = load_calib(kDataDir + "ok_lightllm_q_rank_layout.json");
  EXPECT_EQ(as_written.q_scales->num_head, 4);

  CalibData d = load_calib(kDataDir + "ok_per_head_q.json");
  // One Q scale per layer for both KV heads (a divisor of H): kept, and repeated by the slice.
  d.q_scales = QScales{1, {0.5f, 0.25f}};
  const CalibData one = parse_calib(calib_to_json(d), "one.json", two);
  EXPECT_EQ(one.q_scales->num_head, 1);
  const RankScales r = slice_for_rank(one, 2, 1);
  EXPECT_EQ(*r.q, (std::vector<float>{0.5f, 0.25f}));
  // 3 columns for 2 KV heads: neither.
  d.q_scales = QScales{3, {0.5f, 0.25f, 0.125f, 0.5f, 0.25f, 0.125f}};
  const std::string msg = error_of([&] { parse_calib(calib_to_json(d), "three.json", two); });
  EXPECT_NE(msg.find("three.json: field 'q_calibration.num_head': expected 2 (the model's KV "
                     "heads), a divisor of it or a multiple of it (LightLLM's per-rank layout), "
                     "found 3"),
            std::string::npos)
      << msg;
}

TEST(Calib, HostileTextInMemory) {
  // Deep nesting of objects, and brackets inside strings that must not count as nesting.
  std::string deep;
  for (int i = 0; i < 1000; ++i) deep += "{\"a\":";
  EXPECT_NE(error_of([&] { parse_calib(deep, "deep.json"); }).find("nested deeper"),
            std::string::npos);
  const std::string in_string = "{\"version\": \"" + std::string(1000, '[') + "\\\"\"}";
  EXPECT_NE(
      error_of([&] { parse_calib(in_string, "s.json"); }).find("missing field 'architectures'"),
      std::string::npos);
  // Whitespace only, and a lone number.
  EXPECT_NE(error_of([&] { parse_calib(" \n\t", "ws.json"); }).find("empty"), std::string::npos);
  EXPECT_NE(error_of([&] { parse_calib("3", "n.json"); }).find("expected a JSON object"),
            std::string::npos);
  // Infinity and -Infinity from Python's json module.
  const std::string inf = "{\"qmax\": -Infinity}";
  EXPECT_NE(error_of([&] { parse_calib(inf, "i.json"); }).find("'Infinity' at line 1, column 11"),
            std::string::npos);
}

}  // namespace
}  // namespace fp8kv
