// The device FP8 codecs the kernels use (kernels/cuda/common.cuh: cuda_fp8.h hardware converts)
// against fp8kv/fp8.h: every one of the 2^32 float32 bit patterns through the device encoder
// equals float_to_e4m3 (the same function the host runs, compiled for the device; a strided
// sample of 2^24 patterns is also checked against the host itself), and every e4m3 code decodes
// to e4m3_to_float; the same for the e5m2 pair converter and decoder (the fp8-e5m2 cache)
// against float_to_e5m2 / e5m2_to_float. Skips without a Hopper GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "fp8kv/backend.h"
#include "fp8kv/fp8.h"
#include "kernels/cuda/common.cuh"

namespace fp8kv {
namespace {

// Counts the patterns u in [0, 2^32) where the hardware encoder disagrees with fp8.h's, and
// records the smallest. Each thread takes pairs (u, u+1) through the packed fp8x2 path as well.
__global__ void encode_all_kernel(unsigned long long* mismatches, unsigned int* first_bad) {
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x * 2;
  for (uint64_t u = (static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * 2;
       u < (1ull << 32); u += stride) {
    const float x = __uint_as_float(static_cast<uint32_t>(u));
    const float y = __uint_as_float(static_cast<uint32_t>(u + 1));
    const uint8_t want_x = float_to_e4m3(x), want_y = float_to_e4m3(y);
    const uint16_t pair = cuda::float2_to_e4m3x2_hw(x, y);
    const uint8_t want5_x = float_to_e5m2(x), want5_y = float_to_e5m2(y);
    const uint16_t pair5 = cuda::float2_to_e5m2x2_hw(x, y);
    const bool bad_x =
        cuda::float_to_e4m3_hw(x) != want_x || (pair & 0xff) != want_x || (pair5 & 0xff) != want5_x;
    const bool bad_y =
        cuda::float_to_e4m3_hw(y) != want_y || (pair >> 8) != want_y || (pair5 >> 8) != want5_y;
    if (bad_x || bad_y) {
      atomicAdd(mismatches, static_cast<unsigned long long>(bad_x) + bad_y);
      atomicMin(first_bad, static_cast<unsigned int>(bad_x ? u : u + 1));
    }
  }
}

__global__ void encode_sample_kernel(const uint32_t* in, uint8_t* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = cuda::float_to_e4m3_hw(__uint_as_float(in[i]));
}

// out[0, 256): e4m3 codes; out[256, 512): e5m2 codes.
__global__ void decode_all_kernel(float* out) {
  const int c = threadIdx.x;  // 256 codes, in pairs
  if (c < 128) {
    const uint16_t two = static_cast<uint16_t>((2 * c) | ((2 * c + 1) << 8));
    const float2 f = cuda::e4m3x2_to_float2(two);
    out[2 * c] = f.x;
    out[2 * c + 1] = f.y;
    const float2 g = cuda::e5m2x2_to_float2(two);
    out[256 + 2 * c] = g.x;
    out[256 + 2 * c + 1] = g.y;
  }
}

// Counts the floats x (all 2^32 patterns) where ScaleDivider(s).divide -- quantize-on-write's
// x / s -- gives another e4m3 or e5m2 code than the IEEE division, or other bits where |x| >=
// 2^-100 (NaN: any NaN). Below that the correction's remainder may underflow and the last bits
// differ, but the quotient is then below 2^-40 and every FP8 code rounds it to a zero of x's sign.
// The floats go in batches of 4 adjacent patterns, so that an element which needs the division
// (x infinite, x r overflowing) sends finite neighbours down that path as well.
__global__ void divide_all_kernel(float s, unsigned long long* mismatches,
                                  unsigned int* first_bad) {
  const cuda::ScaleDivider div(s);
  const uint64_t stride = 4ull * gridDim.x * blockDim.x;
  for (uint64_t u = 4ull * (static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x);
       u < (1ull << 32); u += stride) {
    float x[4], got[4];
    for (int i = 0; i < 4; ++i) x[i] = __uint_as_float(static_cast<uint32_t>(u + i));
    div.divide(x, got);
    for (int i = 0; i < 4; ++i) {
      const float want = __fdiv_rn(x[i], s);
      const bool same_bits =
          __float_as_uint(want) == __float_as_uint(got[i]) || (isnan(want) && isnan(got[i]));
      const bool same_codes = float_to_e4m3(want) == float_to_e4m3(got[i]) &&
                              float_to_e5m2(want) == float_to_e5m2(got[i]);
      if (!same_codes || (!same_bits && fabsf(x[i]) >= 0x1p-100f)) {
        atomicAdd(mismatches, 1ull);
        atomicMin(first_bad, static_cast<unsigned int>(u + i));
      }
    }
  }
}

#define CUDA_OK(call) ASSERT_EQ((call), cudaSuccess) << #call

TEST(CudaCodec, EncoderMatchesOnEveryFloat) {
  if (!cuda_available()) GTEST_SKIP() << "no Hopper GPU";
  unsigned long long* d_count = nullptr;
  unsigned int* d_first = nullptr;
  CUDA_OK(cudaMalloc(&d_count, sizeof *d_count));
  CUDA_OK(cudaMalloc(&d_first, sizeof *d_first));
  CUDA_OK(cudaMemset(d_count, 0, sizeof *d_count));
  CUDA_OK(cudaMemset(d_first, 0xff, sizeof *d_first));
  encode_all_kernel<<<132 * 16, 256>>>(d_count, d_first);
  CUDA_OK(cudaGetLastError());
  CUDA_OK(cudaDeviceSynchronize());
  unsigned long long count = 0;
  unsigned int first = 0;
  CUDA_OK(cudaMemcpy(&count, d_count, sizeof count, cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(&first, d_first, sizeof first, cudaMemcpyDeviceToHost));
  cudaFree(d_count);
  cudaFree(d_first);
  EXPECT_EQ(count, 0ull) << "first mismatching float bits 0x" << std::hex << first;
}

TEST(CudaCodec, EncoderMatchesHostOnStridedSample) {
  if (!cuda_available()) GTEST_SKIP() << "no Hopper GPU";
  // 2^24 patterns: stride 256 with an odd offset per block, plus every boundary of the format.
  std::vector<uint32_t> in;
  for (uint64_t u = 0; u < (1ull << 32); u += 256)
    in.push_back(static_cast<uint32_t>(u + ((u >> 8) * 37) % 256));
  for (float b : {448.0f, 464.0f, 463.99f, 480.0f, 0.001953125f, 0.0009765625f, 0.015625f, 0.0f,
                  -0.0f, INFINITY, -INFINITY, NAN, 240.0f, 1.0f / 1024, 3.0f / 1024}) {
    const uint32_t u = detail::float_bits(b);
    for (int d = -2; d <= 2; ++d) {
      in.push_back(u + d);
      in.push_back((u ^ 0x80000000u) + d);
    }
  }
  const int n = static_cast<int>(in.size());
  uint32_t* d_in = nullptr;
  uint8_t* d_out = nullptr;
  CUDA_OK(cudaMalloc(&d_in, n * sizeof(uint32_t)));
  CUDA_OK(cudaMalloc(&d_out, n));
  CUDA_OK(cudaMemcpy(d_in, in.data(), n * sizeof(uint32_t), cudaMemcpyHostToDevice));
  encode_sample_kernel<<<(n + 255) / 256, 256>>>(d_in, d_out, n);
  CUDA_OK(cudaGetLastError());
  std::vector<uint8_t> out(n);
  CUDA_OK(cudaMemcpy(out.data(), d_out, n, cudaMemcpyDeviceToHost));
  cudaFree(d_in);
  cudaFree(d_out);
  int64_t bad = 0;
  for (int i = 0; i < n; ++i) {
    const uint8_t want = float_to_e4m3(detail::bits_float(in[i]));
    if (out[i] != want && bad++ < 5) {
      ADD_FAILURE() << "bits 0x" << std::hex << in[i] << ": device " << int(out[i]) << " host "
                    << int(want);
    }
  }
  EXPECT_EQ(bad, 0);
}

TEST(CudaCodec, DecoderMatchesEveryCode) {
  if (!cuda_available()) GTEST_SKIP() << "no Hopper GPU";
  float* d_out = nullptr;
  CUDA_OK(cudaMalloc(&d_out, 512 * sizeof(float)));
  decode_all_kernel<<<1, 128>>>(d_out);
  CUDA_OK(cudaGetLastError());
  std::vector<float> out(512);
  CUDA_OK(cudaMemcpy(out.data(), d_out, 512 * sizeof(float), cudaMemcpyDeviceToHost));
  cudaFree(d_out);
  for (int i = 0; i < 512; ++i) {
    const int c = i % 256;
    const float want =
        i < 256 ? e4m3_to_float(static_cast<uint8_t>(c)) : e5m2_to_float(static_cast<uint8_t>(c));
    const char* codec = i < 256 ? "e4m3" : "e5m2";
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(out[i])) << codec << " code " << c;
    } else {
      EXPECT_EQ(detail::float_bits(out[i]), detail::float_bits(want)) << codec << " code " << c;
    }
  }
}

// The quantizer divides by a scale through a reciprocal and one FMA correction (common.cuh's
// ScaleDivider); for every float x its FP8 codes must be the division's -- which the CPU twin
// does -- and its bits too for every |x| >= 2^-100.
// Scales: the edges of the fast path and beyond it, mantissas of all ones, the usual amax / 448,
// and random ones over 2^-40..2^30.
TEST(CudaCodec, ScaleDividerEqualsDivisionOnEveryFloat) {
  if (!cuda_available()) GTEST_SKIP() << "no Hopper GPU";
  std::vector<float> scales = {1.0f,           1.0f / 448, 0.7f / 448, 3.0f,
                               0x1.fffffep0f,  0x1p-60f,   0x1p60f,    0x1.fffffep-61f,
                               0x1.000002p60f, 1e-40f,     3.4e38f,    0x1.fffffep-1f,
                               12345.678f};
  uint64_t lcg = 0x9e3779b97f4a7c15ull;
  for (int i = 0; i < 12; ++i) {
    lcg = lcg * 6364136223846793005ull + 1442695040888963407ull;
    const float mant = 1.0f + static_cast<float>((lcg >> 40) & 0xffffff) / 16777216.0f;
    scales.push_back(std::ldexp(mant, static_cast<int>((lcg >> 20) % 71) - 40));
  }
  unsigned long long* d_count = nullptr;
  unsigned int* d_first = nullptr;
  CUDA_OK(cudaMalloc(&d_count, sizeof *d_count));
  CUDA_OK(cudaMalloc(&d_first, sizeof *d_first));
  for (float s : scales) {
    CUDA_OK(cudaMemset(d_count, 0, sizeof *d_count));
    CUDA_OK(cudaMemset(d_first, 0xff, sizeof *d_first));
    divide_all_kernel<<<132 * 16, 256>>>(s, d_count, d_first);
    CUDA_OK(cudaGetLastError());
    CUDA_OK(cudaDeviceSynchronize());
    unsigned long long count = 0;
    unsigned int first = 0;
    CUDA_OK(cudaMemcpy(&count, d_count, sizeof count, cudaMemcpyDeviceToHost));
    CUDA_OK(cudaMemcpy(&first, d_first, sizeof first, cudaMemcpyDeviceToHost));
    EXPECT_EQ(count, 0ull) << "scale " << std::hexfloat << s << ": first mismatching x bits 0x"
                           << std::hex << first;
  }
  cudaFree(d_count);
  cudaFree(d_first);
}

}  // namespace
}  // namespace fp8kv
