// FP8 (E4M3FN, E5M2) and bf16 conversions, shared by host and device code so that the CPU
// backend writes the very same bytes as the GPU. Proven bit-exact against cuda_fp8.h's
// __nv_cvt_float_to_fp8(x, __NV_SATFINITE, ...) by tests/core/fp8_test.cpp.
//
// Encoding rounds to nearest even and saturates: finite values (and infinities) beyond the
// largest finite value map to it with their sign; NaN stays NaN.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FP8KV_HD __host__ __device__ __forceinline__
#else
#define FP8KV_HD inline
#endif

namespace fp8kv {

// Largest finite magnitudes; a scale is `amax / kE4m3Max` and `real = fp8 * scale`.
constexpr float kE4m3Max = 448.0f;
constexpr float kE5m2Max = 57344.0f;

namespace detail {

FP8KV_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}

FP8KV_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}

// v >> shift, rounded to nearest, ties to even.
FP8KV_HD uint32_t shift_rne(uint32_t v, int shift) {
  if (shift <= 0) return v;
  if (shift >= 32) return 0;
  const uint32_t q = v >> shift;
  const uint32_t rem = v & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1);
  return (rem > half || (rem == half && (q & 1u))) ? q + 1u : q;
}

// Saturating round-to-nearest-even encoder of float32 into an 8-bit float with kExpBits
// exponent bits, kManBits mantissa bits and the given bias; max_code is the code of the
// largest finite value, nan_code the (positive) NaN code.
template <int kManBits, int kBias>
FP8KV_HD uint8_t encode_fp8(float x, uint32_t max_bits, uint8_t max_code, uint8_t nan_code) {
  const uint32_t u = float_bits(x);
  const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80u);
  const uint32_t a = u & 0x7fffffffu;
  // NaN keeps no sign, as in cuda_fp8.h: every NaN encodes to the positive NaN code.
  if (a > 0x7f800000u) return nan_code;
  if (a >= max_bits) return static_cast<uint8_t>(sign | max_code);  // saturate, incl. inf
  const int exp = static_cast<int>(a >> 23) - 127;
  if (exp < -126) return sign;  // float32 subnormals are far below the fp8 range
  const uint32_t mant = (a & 0x7fffffu) | 0x800000u;  // 24 significant bits
  // Below the smallest normal exponent the fp8 value is subnormal: shift further right.
  const int min_exp = 1 - kBias;
  const int extra = exp < min_exp ? (min_exp - exp) : 0;
  const uint32_t r = shift_rne(mant, (23 - kManBits) + extra);
  // For normals r is in [2^M, 2^(M+1)]: adding it to the biased exponent field minus the implicit
  // bit carries into the exponent when rounding overflows the mantissa. For subnormals r is the
  // code itself (and r == 2^M is exactly the smallest normal).
  uint32_t code =
      extra ? r : ((static_cast<uint32_t>(exp + kBias) << kManBits) + r - (1u << kManBits));
  if (code > max_code) code = max_code;
  return static_cast<uint8_t>(sign | code);
}

}  // namespace detail

// float32 -> E4M3FN (bias 7, max 448, NaN = S.1111.111, no infinities).
FP8KV_HD uint8_t float_to_e4m3(float x) {
  return detail::encode_fp8<3, 7>(x, 0x43e00000u /* 448.0f */, 0x7e, 0x7f);
}

// E4M3FN -> float32 (exact).
FP8KV_HD float e4m3_to_float(uint8_t b) {
  const uint32_t sign = static_cast<uint32_t>(b & 0x80u) << 24;
  const uint32_t exp = (b >> 3) & 0xfu;
  const uint32_t man = b & 0x7u;
  if (exp == 0xfu && man == 0x7u) return detail::bits_float(sign | 0x7fc00000u);
  if (exp == 0) {  // subnormal: man * 2^-9
    const float mag = static_cast<float>(man) * 0.001953125f;
    return sign ? -mag : mag;
  }
  return detail::bits_float(sign | ((exp - 7u + 127u) << 23) | (man << 20));
}

// float32 -> E5M2 (bias 15, max 57344, saturating; infinities saturate, NaN stays NaN).
FP8KV_HD uint8_t float_to_e5m2(float x) {
  return detail::encode_fp8<2, 15>(x, 0x47600000u /* 57344.0f */, 0x7b, 0x7f);
}

// E5M2 -> float32 (exact; codes 0x7c/0xfc are infinities, 0x7d..0x7f NaN).
FP8KV_HD float e5m2_to_float(uint8_t b) {
  const uint32_t sign = static_cast<uint32_t>(b & 0x80u) << 24;
  const uint32_t exp = (b >> 2) & 0x1fu;
  const uint32_t man = b & 0x3u;
  if (exp == 0x1fu) return detail::bits_float(sign | (man ? 0x7fc00000u : 0x7f800000u));
  if (exp == 0) {  // subnormal: man * 2^-16
    const float mag = static_cast<float>(man) * 1.52587890625e-05f;
    return sign ? -mag : mag;
  }
  return detail::bits_float(sign | ((exp - 15u + 127u) << 23) | (man << 21));
}

// float32 -> bf16 bits, round to nearest even; NaN stays a (quiet) NaN.
FP8KV_HD uint16_t float_to_bf16(float x) {
  const uint32_t u = detail::float_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  const uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>((u + rounding) >> 16);
}

// bf16 bits -> float32 (exact).
FP8KV_HD float bf16_to_float(uint16_t b) {
  return detail::bits_float(static_cast<uint32_t>(b) << 16);
}

// IEEE half bits -> float32 (exact).
FP8KV_HD float f16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0x1f) return detail::bits_float(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {  // subnormal: man * 2^-24
    const float mag = static_cast<float>(man) * 5.9604644775390625e-08f;
    return sign ? -mag : mag;
  }
  return detail::bits_float(sign | ((exp - 15u + 127u) << 23) | (man << 13));
}

// float32 -> IEEE half bits, round to nearest even; beyond 65504 -> infinity; NaN stays NaN.
FP8KV_HD uint16_t float_to_f16(float x) {
  const uint32_t u = detail::float_bits(x);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds past 65504
  const int exp = static_cast<int>(a >> 23) - 127;
  if (exp < -25) return sign;
  const uint32_t mant = (a & 0x7fffffu) | 0x800000u;
  const int extra = exp < -14 ? (-14 - exp) : 0;
  const uint32_t r = detail::shift_rne(mant, 13 + extra);
  const uint32_t code = extra ? r : ((static_cast<uint32_t>(exp + 15) << 10) + r - (1u << 10));
  return static_cast<uint16_t>(sign | code);
}

// IEEE half bits -> bf16 bits: exact through float32, then round to nearest even (bf16 keeps 7
// of half's 10 mantissa bits; every half value, subnormals included, is in bf16's range). The
// GPU weight loader converts fp16 checkpoints with this very function (kernels/cuda/convert.cu).
FP8KV_HD uint16_t f16_to_bf16(uint16_t h) { return float_to_bf16(f16_to_float(h)); }

// Quantize one value for an FP8 cache: q = e4m3(clamp(x / scale, -448, 448)), the clamp being
// the saturation of the encoder. A true division (not a multiply by 1/scale) so that every
// backend rounds the same way and writes the same bytes.
FP8KV_HD uint8_t quantize_e4m3(float x, float scale) { return float_to_e4m3(x / scale); }

// The same for an E5M2 cache: q = e5m2(clamp(x / scale, -57344, 57344)). The fp8-e5m2 scheme has
// no scales (scale 1: x / 1 is x, the division changes nothing), so K/V are rounded straight to
// e5m2, saturating: |x| beyond 57344 (and infinities) becomes +-57344, NaN stays NaN.
FP8KV_HD uint8_t quantize_e5m2(float x, float scale) { return float_to_e5m2(x / scale); }

}  // namespace fp8kv
