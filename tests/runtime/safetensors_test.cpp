#include "fp8kv/safetensors.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "fp8kv/error.h"
#include "fp8kv/fp8.h"
#include "runtime/test_util.h"

namespace fp8kv {
namespace {

namespace fs = std::filesystem;

// A file from a literal header and `data_bytes` zero bytes of data.
void write_raw(const std::string& path, const std::string& header, size_t data_bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out.put(static_cast<char>((n >> (8 * i)) & 0xff));
  out << header;
  out << std::string(data_bytes, '\0');
}

TEST(Safetensors, RoundTripAllDtypes) {
  TempDir dir;
  const std::string path = dir.path() + "/t.safetensors";
  const std::vector<float> values = {1.0f, -2.5f, 0.15625f, 3e-5f, -65504.0f, 0.0f};
  const std::vector<TensorSpec> specs = {{"a.bf16", DType::kBF16, {2, 3}},
                                         {"b.f16", DType::kF16, {6}},
                                         {"c.f32", DType::kF32, {3, 2}}};
  write_safetensors(path, specs, [&](size_t i, uint8_t* dst, size_t bytes) {
    for (size_t e = 0; e < values.size(); ++e) {
      if (specs[i].dtype == DType::kF32) {
        std::memcpy(dst + 4 * e, &values[e], 4);
      } else {
        const uint16_t h =
            specs[i].dtype == DType::kBF16 ? float_to_bf16(values[e]) : float_to_f16(values[e]);
        std::memcpy(dst + 2 * e, &h, 2);
      }
    }
    EXPECT_EQ(bytes, values.size() * static_cast<size_t>(dtype_bytes(specs[i].dtype)));
  });
  SafetensorsFile f(path);
  EXPECT_EQ(f.names().size(), 3u);
  EXPECT_EQ(f.info("a.bf16").shape, (std::vector<int64_t>{2, 3}));
  const auto a = f.read_f32("a.bf16", {2, 3});
  const auto b = f.read_f32("b.f16");
  const auto c = f.read_f32("c.f32", {3, 2});
  for (size_t e = 0; e < values.size(); ++e) {
    EXPECT_EQ(a[e], bf16_to_float(float_to_bf16(values[e])));
    EXPECT_EQ(b[e], f16_to_float(float_to_f16(values[e])));
    EXPECT_EQ(c[e], values[e]);
  }
  EXPECT_NEAR(b[3], 3e-5f, 1e-7f);  // an f16 subnormal
  // The data section starts 8-byte aligned, as the reference writer makes it.
  std::ifstream in(path, std::ios::binary);
  uint64_t n = 0;
  in.read(reinterpret_cast<char*>(&n), 8);
  EXPECT_EQ((8 + n) % 8, 0u);
}

TEST(Safetensors, F16CodecMatchesKnownBits) {
  EXPECT_EQ(float_to_f16(1.0f), 0x3c00);
  EXPECT_EQ(float_to_f16(-2.0f), 0xc000);
  EXPECT_EQ(float_to_f16(65504.0f), 0x7bff);
  EXPECT_EQ(float_to_f16(1e6f), 0x7c00);            // overflow -> inf
  EXPECT_EQ(float_to_f16(5.9604645e-08f), 0x0001);  // smallest subnormal
  EXPECT_EQ(f16_to_float(0x3555), 0.333251953125f);
  for (uint32_t h = 0; h < 0x7c00; ++h) {  // every finite positive half round-trips
    ASSERT_EQ(float_to_f16(f16_to_float(static_cast<uint16_t>(h))), h);
  }
}

TEST(Safetensors, TruncatedFileNamesFileAndTensor) {
  TempDir dir;
  const std::string path = dir.path() + "/t.safetensors";
  write_safetensors(path, {{"w", DType::kF32, {4, 4}}}, [](size_t, uint8_t*, size_t) {});
  fs::resize_file(path, fs::file_size(path) - 8);
  const std::string e = error_of([&] { SafetensorsFile f(path); });
  EXPECT_NE(e.find(path), std::string::npos) << e;
  EXPECT_NE(e.find("'w'"), std::string::npos) << e;
  EXPECT_NE(e.find("truncated"), std::string::npos) << e;

  write_raw(path, "{}", 0);
  fs::resize_file(path, 5);
  EXPECT_NE(error_of([&] { SafetensorsFile f(path); }).find("too short"), std::string::npos);
}

TEST(Safetensors, HeaderLengthBeyondFile) {
  TempDir dir;
  const std::string path = dir.path() + "/t.safetensors";
  write_raw(path, "{}", 0);
  std::fstream f(path, std::ios::binary | std::ios::in | std::ios::out);
  const char big[8] = {0, 0, 0, 1, 0, 0, 0, 0};
  f.write(big, 8);
  f.close();
  const std::string e = error_of([&] { SafetensorsFile s(path); });
  EXPECT_NE(e.find("header length"), std::string::npos) << e;
}

TEST(Safetensors, BadOffsets) {
  TempDir dir;
  const std::string path = dir.path() + "/t.safetensors";
  // Span disagrees with dtype x shape.
  write_raw(path, R"({"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}})", 16);
  std::string e = error_of([&] { SafetensorsFile s(path); });
  EXPECT_NE(e.find("'w'"), std::string::npos) << e;
  EXPECT_NE(e.find("needs 16"), std::string::npos) << e;
  // End before begin.
  write_raw(path, R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[8,4]}})", 16);
  e = error_of([&] { SafetensorsFile s(path); });
  EXPECT_NE(e.find("outside the data section"), std::string::npos) << e;
  // Negative offset, missing field, bad JSON.
  write_raw(path, R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}})", 16);
  EXPECT_NE(error_of([&] { SafetensorsFile s(path); }).find("non-negative"), std::string::npos);
  write_raw(path, R"({"w":{"dtype":"F32","shape":[1]}})", 16);
  EXPECT_NE(error_of([&] { SafetensorsFile s(path); }).find("data_offsets"), std::string::npos);
  write_raw(path, R"({"w":)", 16);
  EXPECT_NE(error_of([&] { SafetensorsFile s(path); }).find("not valid JSON"), std::string::npos);
}

TEST(Safetensors, UnknownDtype) {
  TempDir dir;
  const std::string path = dir.path() + "/t.safetensors";
  write_raw(path, R"({"q":{"dtype":"I8","shape":[4],"data_offsets":[0,4]}})", 4);
  const std::string e = error_of([&] { SafetensorsFile s(path); });
  EXPECT_NE(e.find("'q'"), std::string::npos) << e;
  EXPECT_NE(e.find("'I8'"), std::string::npos) << e;
  EXPECT_NE(e.find(path), std::string::npos) << e;
}

TEST(Safetensors, MissingTensorAndWrongShape) {
  TempDir dir;
  write_safetensors(dir.path() + "/model.safetensors", {{"a", DType::kBF16, {2, 8}}},
                    [](size_t, uint8_t*, size_t) {});
  WeightStore store(dir.path());
  EXPECT_TRUE(store.has("a"));
  std::string e = error_of([&] { store.read_f32("b", {2, 8}); });
  EXPECT_NE(e.find("missing tensor 'b'"), std::string::npos) << e;
  EXPECT_NE(e.find("model.safetensors"), std::string::npos) << e;
  e = error_of([&] { store.read_f32("a", {8, 2}); });
  EXPECT_NE(e.find("'a'"), std::string::npos) << e;
  EXPECT_NE(e.find("[2, 8]"), std::string::npos) << e;
  EXPECT_NE(e.find("expected [8, 2]"), std::string::npos) << e;
  EXPECT_NE(error_of([&] { WeightStore s(dir.path() + "/nope"); }).find("not a model folder"),
            std::string::npos);
}

TEST(Safetensors, ShardedIndex) {
  TempDir dir;
  auto fill_with = [](float v) {
    return [v](size_t, uint8_t* dst, size_t bytes) {
      for (size_t i = 0; i < bytes / 4; ++i) std::memcpy(dst + 4 * i, &v, 4);
    };
  };
  write_safetensors(dir.path() + "/model-00001-of-00002.safetensors", {{"x", DType::kF32, {3}}},
                    fill_with(1.5f));
  write_safetensors(dir.path() + "/model-00002-of-00002.safetensors",
                    {{"y", DType::kF32, {2}}, {"z", DType::kF32, {1}}}, fill_with(-4.0f));
  {
    std::ofstream idx(dir.path() + "/model.safetensors.index.json");
    idx << R"({"metadata": {"total_size": 24}, "weight_map": {
      "x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors",
      "z": "model-00002-of-00002.safetensors"}})";
  }
  WeightStore store(dir.path());
  EXPECT_EQ(store.files().size(), 2u);
  EXPECT_EQ(store.read_f32("x", {3}), (std::vector<float>{1.5f, 1.5f, 1.5f}));
  EXPECT_EQ(store.read_f32("y", {2}), (std::vector<float>{-4.0f, -4.0f}));

  // An index that places a tensor in a shard without it.
  {
    std::ofstream idx(dir.path() + "/model.safetensors.index.json");
    idx << R"({"weight_map": {"x": "model-00002-of-00002.safetensors"}})";
  }
  std::string e = error_of([&] { WeightStore s(dir.path()); });
  EXPECT_NE(e.find("no tensor 'x'"), std::string::npos) << e;
  // An index naming a shard that does not exist.
  {
    std::ofstream idx(dir.path() + "/model.safetensors.index.json");
    idx << R"({"weight_map": {"x": "model-00009-of-00009.safetensors"}})";
  }
  e = error_of([&] { WeightStore s(dir.path()); });
  EXPECT_NE(e.find("model-00009-of-00009.safetensors"), std::string::npos) << e;
}

}  // namespace
}  // namespace fp8kv
