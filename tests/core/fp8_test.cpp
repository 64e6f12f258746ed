// FP8 and bf16 codecs (include/fp8kv/fp8.h).
//
// Bit-exactness is proven against CUDA's own conversion, __nv_cvt_float_to_fp8 with
// __NV_SATFINITE from cuda_fp8.h (its host path runs on the CPU), over every one of the 2^32
// float32 bit patterns, for E4M3 and for E5M2. Decoding is checked over all 256 codes of each
// format against __nv_cvt_fp8_to_halfraw. Without CUDA headers (FP8KV_CUDA=OFF) the sweep
// compares with a slow, independent encoder written from the definition instead.
#include "fp8kv/fp8.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>

#if defined(FP8KV_HAVE_CUDA_HEADERS)
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#endif

namespace fp8kv {
namespace {

float from_bits(uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

// Independent reference: nearest representable value by exhaustive search over the codes,
// ties to the even code; saturating; NaN -> positive NaN code. Slow, clear, obviously right.
template <typename Decode>
uint8_t encode_by_search(float x, Decode decode, uint8_t nan_code, float max_finite) {
  if (std::isnan(x)) return nan_code;
  const bool neg = std::signbit(x);
  double a = std::fabs(static_cast<double>(x));
  if (a >= max_finite) a = max_finite;
  int best = 0;
  double best_err = std::numeric_limits<double>::infinity();
  for (int c = 0; c < 128; ++c) {
    const float v = decode(static_cast<uint8_t>(c));
    if (!std::isfinite(v)) continue;
    const double err = std::fabs(static_cast<double>(v) - a);
    if (err < best_err || (err == best_err && (c % 2 == 0))) {
      best = c;
      best_err = err;
    }
  }
  return static_cast<uint8_t>((neg ? 0x80 : 0) | best);
}

TEST(Fp8, E4m3DecodeAll256) {
  for (int c = 0; c < 256; ++c) {
    const float ours = e4m3_to_float(static_cast<uint8_t>(c));
#if defined(FP8KV_HAVE_CUDA_HEADERS)
    const __half_raw h = __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(c), __NV_E4M3);
    const float theirs = __half2float(__half(h));
#else
    // From the definition: bias 7, 3 mantissa bits, S.1111.111 is NaN.
    const int e = (c >> 3) & 15, m = c & 7;
    float theirs = (e == 15 && m == 7) ? NAN
                   : e == 0            ? std::ldexp(static_cast<float>(m), -9)
                                       : std::ldexp(1.0f + m / 8.0f, e - 7);
    if (c & 0x80) theirs = -theirs;
#endif
    if (std::isnan(theirs)) {
      EXPECT_TRUE(std::isnan(ours)) << "code " << c;
    } else {
      EXPECT_EQ(ours, theirs) << "code " << c;
      EXPECT_EQ(std::signbit(ours), std::signbit(theirs)) << "code " << c;
    }
  }
  EXPECT_EQ(e4m3_to_float(0x7e), 448.0f);
  EXPECT_EQ(e4m3_to_float(0x01), std::ldexp(1.0f, -9));
  EXPECT_TRUE(std::isnan(e4m3_to_float(0x7f)));
  EXPECT_TRUE(std::isnan(e4m3_to_float(0xff)));
}

TEST(Fp8, E5m2DecodeAll256) {
  for (int c = 0; c < 256; ++c) {
    const float ours = e5m2_to_float(static_cast<uint8_t>(c));
#if defined(FP8KV_HAVE_CUDA_HEADERS)
    const __half_raw h = __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(c), __NV_E5M2);
    const float theirs = __half2float(__half(h));
#else
    const int e = (c >> 2) & 31, m = c & 3;
    float theirs = e == 31  ? (m ? NAN : INFINITY)
                   : e == 0 ? std::ldexp(static_cast<float>(m), -16)
                            : std::ldexp(1.0f + m / 4.0f, e - 15);
    if (c & 0x80) theirs = -theirs;
#endif
    if (std::isnan(theirs)) {
      EXPECT_TRUE(std::isnan(ours)) << "code " << c;
    } else {
      EXPECT_EQ(ours, theirs) << "code " << c;
      EXPECT_EQ(std::signbit(ours), std::signbit(theirs)) << "code " << c;
    }
  }
  EXPECT_EQ(e5m2_to_float(0x7b), 57344.0f);
  EXPECT_TRUE(std::isinf(e5m2_to_float(0x7c)));
}

TEST(Fp8, EncodeSpotValues) {
  EXPECT_EQ(float_to_e4m3(0.0f), 0x00);
  EXPECT_EQ(float_to_e4m3(-0.0f), 0x80);
  EXPECT_EQ(float_to_e4m3(1.0f), 0x38);
  EXPECT_EQ(float_to_e4m3(448.0f), 0x7e);
  EXPECT_EQ(float_to_e4m3(463.99f), 0x7e);  // would round to 480 (NaN code): saturates
  EXPECT_EQ(float_to_e4m3(1e30f), 0x7e);
  EXPECT_EQ(float_to_e4m3(-INFINITY), 0xfe);
  EXPECT_EQ(float_to_e4m3(NAN), 0x7f);
  // Ties to even: 1 + 1/16 lies halfway between 1 (0x38, even) and 1.125 (0x39).
  EXPECT_EQ(float_to_e4m3(1.0625f), 0x38);
  EXPECT_EQ(float_to_e4m3(1.1875f), 0x3a);  // halfway between 0x39 and 0x3a: to even 0x3a
  // Smallest subnormal 2^-9; half of it ties to zero (even), a bit more rounds up.
  EXPECT_EQ(float_to_e4m3(std::ldexp(1.0f, -10)), 0x00);
  EXPECT_EQ(float_to_e4m3(std::nextafter(std::ldexp(1.0f, -10), 1.0f)), 0x01);
  EXPECT_EQ(float_to_e5m2(INFINITY), 0x7b);
  EXPECT_EQ(float_to_e5m2(NAN), 0x7f);
}

// The exhaustive sweep: every float32 bit pattern through both encoders.
TEST(Fp8, EncodeBitExactOverAllFloat32) {
  uint64_t bad_e4m3 = 0, bad_e5m2 = 0;
  uint32_t first_bad_e4m3 = 0, first_bad_e5m2 = 0;
#if defined(FP8KV_HAVE_CUDA_HEADERS)
  constexpr int64_t kStep = 1;
#else
  // The search reference is ~100x slower than CUDA's encoder: without CUDA headers sweep every
  // 251st pattern (1.7e7 values, a prime stride so every exponent and mantissa residue is hit)
  // plus the boundary table below.
  constexpr int64_t kStep = 251;
#endif
#pragma omp parallel for schedule(static) reduction(+ : bad_e4m3, bad_e5m2)
  for (int64_t i = 0; i < (int64_t{1} << 32); i += kStep) {
    const float x = from_bits(static_cast<uint32_t>(i));
#if defined(FP8KV_HAVE_CUDA_HEADERS)
    const uint8_t ref4 = static_cast<uint8_t>(__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3));
    const uint8_t ref5 = static_cast<uint8_t>(__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E5M2));
#else
    const uint8_t ref4 = encode_by_search(x, e4m3_to_float, 0x7f, kE4m3Max);
    const uint8_t ref5 = encode_by_search(x, e5m2_to_float, 0x7f, kE5m2Max);
#endif
    if (float_to_e4m3(x) != ref4) {
#pragma omp critical
      if (!bad_e4m3) first_bad_e4m3 = static_cast<uint32_t>(i);
      ++bad_e4m3;
    }
    if (float_to_e5m2(x) != ref5) {
#pragma omp critical
      if (!bad_e5m2) first_bad_e5m2 = static_cast<uint32_t>(i);
      ++bad_e5m2;
    }
  }
  EXPECT_EQ(bad_e4m3, 0u) << "e.g. bits 0x" << std::hex << first_bad_e4m3;
  EXPECT_EQ(bad_e5m2, 0u) << "e.g. bits 0x" << std::hex << first_bad_e5m2;
}

// Every midpoint between adjacent codes (the rounding ties) and its two float neighbours.
TEST(Fp8, EncodeTiesAndNeighbours) {
  for (int c = 0; c < 0x7e; ++c) {
    const float lo = e4m3_to_float(static_cast<uint8_t>(c));
    const float hi = e4m3_to_float(static_cast<uint8_t>(c + 1));
    const float mid = 0.5f * (lo + hi);  // exact: fp8 values have few bits
    const uint8_t even = (c % 2 == 0) ? c : c + 1;
    EXPECT_EQ(float_to_e4m3(mid), even) << "tie after code " << c;
    EXPECT_EQ(float_to_e4m3(std::nextafter(mid, 0.0f)), c) << "below tie after " << c;
    EXPECT_EQ(float_to_e4m3(std::nextafter(mid, 1e9f)), c + 1) << "above tie after " << c;
    EXPECT_EQ(float_to_e4m3(-mid), 0x80 | even);
  }
}

TEST(Bf16, RoundTripAndRounding) {
  EXPECT_EQ(bf16_to_float(float_to_bf16(1.0f)), 1.0f);
  EXPECT_EQ(float_to_bf16(1.0f), 0x3f80);
  // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1).
  EXPECT_EQ(float_to_bf16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);
  EXPECT_EQ(float_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(NAN))));
  EXPECT_TRUE(std::isinf(bf16_to_float(float_to_bf16(INFINITY))));
  for (uint32_t b = 0; b < 0x10000; ++b) {  // every bf16 survives float and back
    const float x = bf16_to_float(static_cast<uint16_t>(b));
    if (std::isnan(x)) continue;  // NaN payloads are quieted; checked above
    EXPECT_EQ(float_to_bf16(x), b);
  }
}

TEST(Fp8, QuantizeDividesByScale) {
  // q = e4m3(clamp(x / s)): 0.3 / 0.1 in float is 2.9999998, which rounds to code 3.0 (0x44).
  EXPECT_EQ(quantize_e4m3(0.3f, 0.1f), float_to_e4m3(0.3f / 0.1f));
  EXPECT_EQ(quantize_e4m3(1000.0f, 1.0f), 0x7e);  // clamp to 448
  EXPECT_EQ(quantize_e4m3(-1000.0f, 1.0f), 0xfe);
}

// The split of bf16 Q into two e4m3 parts that fp8-per-tensor's prefill at head_dim 128 runs on
// (WsShape::kQSplit, prefill_ws.cuh; docs/DESIGN.md "Per-tensor scales with FP8 Q"): a tile's q
// scaled by the power of two that puts its largest |q| in [2^7, 2^8), then hi = e4m3(x) and
// lo = e4m3(x - hi), with the kernel's rounding (cvt.rn.satfinite, float_to_e4m3's bytes). For
// every bf16 value of such a tile: hi + lo == x exactly where |x| >= 2^-2 (the residual has at
// most 4 significant bits, none below e4m3's subnormal step 2^-9), else within 2^-10 (half that
// step), 2^-17 of the tile's largest.
TEST(Fp8, E4m3HiLoSplitKeepsBf16Bits) {
  for (int max_exponent : {-20, -3, 0, 5, 30}) {
    const float scale = std::ldexp(1.0f, 7 - max_exponent);
    int exact = 0;
    for (uint32_t bits = 0; bits < 0x7f80u; ++bits) {  // every finite non-negative bf16
      const float q = bf16_to_float(static_cast<uint16_t>(bits));
      if (q >= std::ldexp(1.0f, max_exponent + 1)) break;  // above the tile's largest
      for (float sign : {1.0f, -1.0f}) {
        const float x = sign * q * scale;
        const float hi = e4m3_to_float(float_to_e4m3(x));
        const float lo = e4m3_to_float(float_to_e4m3(x - hi));
        if (std::fabs(x) >= 0.25f) {
          ASSERT_EQ(hi + lo, x) << "q " << q << " scale " << scale;
          ++exact;
        } else {
          ASSERT_LE(std::fabs(hi + lo - x), std::ldexp(1.0f, -10)) << "q " << q;
        }
      }
    }
    // 2^7 .. 2^8 down to 2^-2: 10 binades of 128 values, both signs
    EXPECT_EQ(exact, 2 * 10 * 128) << "max exponent " << max_exponent;
  }
  // e4m3 alone would not do: 64.5 (8 significant bits) needs lo.
  EXPECT_NE(e4m3_to_float(float_to_e4m3(64.5f)), 64.5f);
}

}  // namespace
}  // namespace fp8kv
