// Backend::upload_tensors on the CPU backend (slices + conversions from host memory, worker
// threads over chunks) and the host parts shared with the CUDA backend (kernels/host_upload.h),
// against a plain element-by-element reference.
//
// Random source bits: the seed is FP8KV_TEST_SEED when set (printed by every test).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "fp8kv/backend.h"
#include "fp8kv/buffer.h"
#include "fp8kv/error.h"
#include "fp8kv/fp8.h"
#include "kernels/host_upload.h"

namespace fp8kv {
namespace {

uint64_t test_seed() {
  const char* s = std::getenv("FP8KV_TEST_SEED");
  const uint64_t seed = s ? std::strtoull(s, nullptr, 10) : 20261129;
  std::printf("seed %llu (FP8KV_TEST_SEED)\n", static_cast<unsigned long long>(seed));
  return seed;
}

// IEEE half bits -> float bits, written from the definition (not with fp8.h's f16_to_float):
// (-1)^s * 2^(e - 15) * 1.m, subnormals 2^-14 * 0.m, e = 31 infinity / NaN (payload kept).
uint32_t f16_bits_to_f32_bits(uint16_t h) {
  const bool neg = (h & 0x8000u) != 0;
  const int e = (h >> 10) & 0x1f;
  const int m = h & 0x3ff;
  if (e == 31) return (neg ? 0x80000000u : 0u) | 0x7f800000u | (static_cast<uint32_t>(m) << 13);
  const double mag = e == 0 ? std::ldexp(m, -24) : std::ldexp(1024 + m, e - 25);
  const float x = static_cast<float>(neg ? -mag : mag);
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}

// Element i of a `from` array as a `to` element (bytes), the reference conversion.
void convert_one(const uint8_t* src, DType from, uint8_t* dst, DType to) {
  if (from == to) {
    std::memcpy(dst, src, dtype_bytes(from));
    return;
  }
  uint32_t bits = 0;  // the exact float32 value
  uint16_t h;
  switch (from) {
    case DType::kF32:
      std::memcpy(&bits, src, 4);
      break;
    case DType::kBF16:
      std::memcpy(&h, src, 2);
      bits = static_cast<uint32_t>(h) << 16;
      break;
    case DType::kF16:
      std::memcpy(&h, src, 2);
      bits = f16_bits_to_f32_bits(h);
      break;
  }
  if (to == DType::kF32) {
    std::memcpy(dst, &bits, 4);
    return;
  }
  float x;
  std::memcpy(&x, &bits, 4);
  const uint16_t b = float_to_bf16(x);  // to BF16: the library's one rounding (fp8.h)
  std::memcpy(dst, &b, 2);
}

// The expected destination bytes of u: its slice, element by element.
std::vector<uint8_t> reference(const HostUpload& u) {
  const int sb = dtype_bytes(u.src_dtype), db = dtype_bytes(u.dst_dtype);
  std::vector<uint8_t> out(static_cast<size_t>(u.rows * u.cols) * db);
  const auto* src = static_cast<const uint8_t*>(u.src);
  for (int64_t r = 0; r < u.rows; ++r) {
    for (int64_t c = 0; c < u.cols; ++c) {
      const int64_t s = (u.row_begin + r) * u.src_cols + u.col_begin + c;
      convert_one(src + s * sb, u.src_dtype, out.data() + (r * u.cols + c) * db, u.dst_dtype);
    }
  }
  return out;
}

std::vector<uint8_t> random_bytes(size_t n, std::mt19937_64& rng) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; i += 8) {
    const uint64_t x = rng();
    std::memcpy(v.data() + i, &x, std::min<size_t>(8, n - i));
  }
  return v;
}

const char* name_of(DType t) {
  return t == DType::kF32 ? "F32" : t == DType::kBF16 ? "BF16" : "F16";
}

// A source [rows, cols] and the slice to take of it.
struct SliceCase {
  int64_t src_rows, src_cols, row_begin, rows, col_begin, cols;
};

TEST(UploadTensors, EveryF16CodeToF32AndBf16) {
  auto be = make_cpu_backend();
  std::vector<uint16_t> codes(65536);
  for (size_t i = 0; i < codes.size(); ++i) codes[i] = static_cast<uint16_t>(i);
  for (DType to : {DType::kF32, DType::kBF16}) {
    HostUpload u;
    u.src = codes.data();
    u.src_dtype = DType::kF16;
    u.src_rows = u.rows = 256;
    u.src_cols = u.cols = 256;
    u.dst_dtype = to;
    BackendBuffer dst(*be, codes.size() * dtype_bytes(to));
    u.dst = dst.get();
    be->upload_tensors({u});
    const std::vector<uint8_t> want = reference(u);
    const auto* got = static_cast<const uint8_t*>(dst.get());
    const int db = dtype_bytes(to);
    for (size_t i = 0; i < codes.size(); ++i) {
      ASSERT_EQ(std::memcmp(got + i * db, want.data() + i * db, db), 0)
          << "F16 0x" << std::hex << i << " -> " << name_of(to);
    }
  }
  // Spot checks of the reference itself.
  EXPECT_EQ(f16_bits_to_f32_bits(0x3c00), 0x3f800000u);  // 1
  EXPECT_EQ(f16_bits_to_f32_bits(0x0001), 0x33800000u);  // 2^-24
  EXPECT_EQ(f16_bits_to_f32_bits(0xfc00), 0xff800000u);  // -inf
  EXPECT_EQ(f16_to_bf16(0x3c00), 0x3f80);
}

TEST(UploadTensors, SlicesAndConversionsMatchReference) {
  const uint64_t seed = test_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  auto be = make_cpu_backend();
  const std::vector<SliceCase> cases = {
      {1, 1, 0, 1, 0, 1},
      {19, 127, 3, 7, 5, 61},          // odd rows and columns in the middle
      {1170, 7, 1, 1169, 3, 3},        // narrow rows
      {1, 39275, 0, 1, 1, 39273},      // one long row, odd column offset
      {127, 1170, 0, 127, 0, 1170},    // whole
      {1170, 1999, 1, 1168, 7, 1991},  // more than one 8 MiB chunk as F32
      {7, 19, 7, 0, 0, 19},            // no rows
  };
  struct Owned {
    std::vector<uint8_t> src;
    std::unique_ptr<BackendBuffer> dst;
  };
  std::vector<Owned> owned;
  std::vector<HostUpload> uploads;
  std::vector<std::string> what;
  for (DType from : {DType::kF32, DType::kBF16, DType::kF16}) {
    for (DType to : {DType::kF32, DType::kBF16}) {
      for (const SliceCase& c : cases) {
        Owned o;
        o.src = random_bytes(static_cast<size_t>(c.src_rows * c.src_cols) * dtype_bytes(from), rng);
        HostUpload u;
        u.src = o.src.data();
        u.src_dtype = from;
        u.dst_dtype = to;
        u.src_rows = c.src_rows;
        u.src_cols = c.src_cols;
        u.row_begin = c.row_begin;
        u.rows = c.rows;
        u.col_begin = c.col_begin;
        u.cols = c.cols;
        // One spare element each side, filled with 0xab, to see that nothing else is written.
        const size_t bytes = static_cast<size_t>(c.rows * c.cols) * dtype_bytes(to);
        o.dst = std::make_unique<BackendBuffer>(*be, bytes + 8);
        std::memset(o.dst->get(), 0xab, bytes + 8);
        u.dst = static_cast<uint8_t*>(o.dst->get()) + 4;
        owned.push_back(std::move(o));
        uploads.push_back(u);
        what.push_back(std::string(name_of(from)) + " -> " + name_of(to) + " [" +
                       std::to_string(c.src_rows) + ", " + std::to_string(c.src_cols) + "] rows " +
                       std::to_string(c.row_begin) + "+" + std::to_string(c.rows) + " cols " +
                       std::to_string(c.col_begin) + "+" + std::to_string(c.cols));
      }
    }
  }
  be->upload_tensors(uploads);  // all at once, as Model::load does
  for (size_t i = 0; i < uploads.size(); ++i) {
    const HostUpload& u = uploads[i];
    const std::vector<uint8_t> want = reference(u);
    const auto* base = static_cast<const uint8_t*>(owned[i].dst->get());
    // An empty slice has no bytes to compare (memcmp must not see a null pointer).
    EXPECT_TRUE(want.empty() || std::memcmp(base + 4, want.data(), want.size()) == 0) << what[i];
    for (size_t k : {size_t{0}, size_t{3}, 4 + want.size(), 7 + want.size()}) {
      EXPECT_EQ(base[k], 0xab) << what[i] << ": byte " << k << " outside the slice written";
    }
    // pack_rows (what the CUDA backend stages) gives the same bytes for any row range.
    if (u.rows > 2) {
      const int db = dtype_bytes(u.dst_dtype);
      std::vector<uint8_t> part(static_cast<size_t>((u.rows - 2) * u.cols) * db);
      pack_rows(u, 1, u.rows - 1, part.data(), u.dst_dtype);
      EXPECT_TRUE(part.empty() ||
                  std::memcmp(part.data(), want.data() + u.cols * db, part.size()) == 0)
          << what[i] << " (pack_rows of rows 1 .. rows - 1)";
    }
  }
}

TEST(UploadTensors, StackedPartsOfOneBuffer) {
  // k_proj rows then v_proj rows of one buffer, as the loader stacks them: a tp slice of each.
  std::mt19937_64 rng(test_seed());
  auto be = make_cpu_backend();
  const int64_t rows = 24, cols = 40;
  const std::vector<uint8_t> k = random_bytes(rows * cols * 2, rng),
                             v = random_bytes(rows * cols * 2, rng);
  BackendBuffer dst(*be, 2 * 8 * cols * 4);
  std::vector<HostUpload> ups(2);
  for (int i = 0; i < 2; ++i) {
    HostUpload& u = ups[i];
    u.src = i == 0 ? k.data() : v.data();
    u.src_dtype = DType::kBF16;
    u.dst_dtype = DType::kF32;
    u.src_rows = rows;
    u.src_cols = cols;
    u.row_begin = 8;
    u.rows = 8;
    u.cols = cols;
    u.dst = static_cast<uint8_t*>(dst.get()) + i * 8 * cols * 4;
  }
  be->upload_tensors(ups);
  const float* got = dst.as<const float>();
  for (int i = 0; i < 2; ++i) {
    const auto& src = i == 0 ? k : v;
    for (int64_t r = 0; r < 8; ++r) {
      for (int64_t c = 0; c < cols; ++c) {
        uint16_t b;
        std::memcpy(&b, src.data() + ((8 + r) * cols + c) * 2, 2);
        const float want = bf16_to_float(b), x = got[(i * 8 + r) * cols + c];
        ASSERT_EQ(std::memcmp(&x, &want, 4), 0) << (i ? "v" : "k") << " row " << r << " col " << c;
      }
    }
  }
}

TEST(UploadTensors, RefusedBeforeAnythingIsCopied) {
  auto be = make_cpu_backend();
  std::vector<float> src(6 * 5, 1.5f);
  BackendBuffer dst(*be, 6 * 5 * 4);
  auto good = [&] {
    HostUpload u;
    u.src = src.data();
    u.dst = dst.get();
    u.src_rows = u.rows = 6;
    u.src_cols = u.cols = 5;
    return u;
  };
  struct Bad {
    HostUpload u;
    const char* expect;
  };
  std::vector<Bad> bad(6, Bad{good(), ""});
  bad[0].u.row_begin = 1;  // rows [1, +6) past 6
  bad[0].expect = "rows [1, +6) is not inside [0, 6)";
  bad[1].u.col_begin = -1;
  bad[1].expect = "cols [-1, +5)";
  bad[2].u.cols = 6;
  bad[2].expect = "cols [0, +6) is not inside [0, 5)";
  bad[3].u.dst_dtype = DType::kF16;
  bad[3].expect = "dst_dtype F16";
  bad[4].u.src = nullptr;
  bad[4].expect = "src is null";
  bad[5].u.src_rows = -2;
  bad[5].expect = "negative";
  for (const Bad& b : bad) {
    std::memset(dst.get(), 0, dst.bytes());
    std::string e = "(no error)";
    try {
      be->upload_tensors({good(), b.u});
    } catch (const Error& x) {
      e = x.what();
    }
    EXPECT_NE(e.find("upload 1: "), std::string::npos) << e;
    EXPECT_NE(e.find(b.expect), std::string::npos) << e;
    EXPECT_EQ(dst.as<const float>()[0], 0.0f) << "upload 0 was copied before the refusal: " << e;
  }
  // An empty upload needs no memory.
  HostUpload empty;
  empty.src_rows = 3;
  empty.src_cols = 4;
  EXPECT_NO_THROW(be->upload_tensors({empty}));
}

TEST(UploadTensors, ChunksCoverEveryRowOnce) {
  std::vector<HostUpload> ups(4);
  ups[0].rows = 10, ups[0].cols = 100, ups[0].dst_dtype = DType::kF32;   // 400-byte rows
  ups[1].rows = 0, ups[1].cols = 100;                                    // none
  ups[2].rows = 3, ups[2].cols = 1000, ups[2].dst_dtype = DType::kBF16;  // a row > max
  ups[3].rows = 7, ups[3].cols = 1, ups[3].dst_dtype = DType::kBF16;
  const size_t max_bytes = 1000;
  const std::vector<UploadChunk> chunks = plan_upload_chunks(ups, max_bytes);
  EXPECT_EQ(largest_upload_row(ups), 2000u);
  std::vector<std::vector<int>> seen(ups.size());
  for (auto& s : seen) s.assign(20, 0);
  for (const UploadChunk& c : chunks) {
    const HostUpload& u = ups[c.upload];
    const size_t row_bytes = static_cast<size_t>(u.cols) * dtype_bytes(u.dst_dtype);
    ASSERT_LT(c.row0, c.row1);
    EXPECT_EQ(c.dst_offset, static_cast<size_t>(c.row0) * row_bytes);
    EXPECT_TRUE(c.row1 - c.row0 == 1 || (c.row1 - c.row0) * row_bytes <= max_bytes);
    for (int64_t r = c.row0; r < c.row1; ++r) ++seen[c.upload][r];
  }
  for (size_t i = 0; i < ups.size(); ++i) {
    for (int64_t r = 0; r < 20; ++r) {
      EXPECT_EQ(seen[i][r], r < ups[i].rows ? 1 : 0) << "upload " << i << " row " << r;
    }
  }
  EXPECT_EQ(chunks.size(), 5u + 3u + 1u);  // 2 rows of 400 bytes per chunk; 1; all 7
}

}  // namespace
}  // namespace fp8kv
