// CudaBackend::upload_tensors (kernels/cuda/upload.cpp: pinned staging, copies overlapped, the
// fp16 -> bf16 kernel of convert.cu) against the CPU backend's (pack_rows, the CPU twin), byte
// for byte: every fp16 code, awkward sizes (1, 7, 19, 127, 1170, 39275), row/column slices with
// odd offsets, every source/destination dtype pair. Skips without a Hopper GPU.
//
// Random source bits: the seed is FP8KV_TEST_SEED when set (printed by every test).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

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
#include "gpu_skip.h"
#include "kernels/cuda/convert.h"

namespace fp8kv {
namespace {

uint64_t test_seed() {
  const char* s = std::getenv("FP8KV_TEST_SEED");
  const uint64_t seed = s ? std::strtoull(s, nullptr, 10) : 20261129;
  std::printf("seed %llu (FP8KV_TEST_SEED)\n", static_cast<unsigned long long>(seed));
  return seed;
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

void check(cudaError_t e, const char* what) {
  ASSERT_EQ(e, cudaSuccess) << what << ": " << cudaGetErrorString(e);
}

// The kernel alone, in place on device memory that starts at an odd element (2-byte aligned
// only) and at an even one, for every size: x[i] = f16_to_bf16(x[i]), and the element after the
// last one untouched.
TEST(CudaUpload, F16ToBf16KernelEveryCodeAndAwkwardSizes) {
  SKIP_WITHOUT_GPU();
  std::vector<uint16_t> codes(65536 + 2);
  for (size_t i = 0; i < codes.size(); ++i)
    codes[i] = static_cast<uint16_t>(i * 40503u);  // odd: all codes
  for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{19}, int64_t{127}, int64_t{1170},
                    int64_t{39275}, int64_t{65536}}) {
    for (int offset : {0, 1}) {
      SCOPED_TRACE("n " + std::to_string(n) + " offset " + std::to_string(offset));
      uint16_t* d = nullptr;
      check(cudaMalloc(&d, (n + 2) * 2), "cudaMalloc");
      check(cudaMemcpy(d, codes.data(), (n + 2) * 2, cudaMemcpyHostToDevice), "to device");
      cuda::launch_f16_to_bf16(d + offset, n, nullptr);
      check(cudaDeviceSynchronize(), "kernel");
      std::vector<uint16_t> got(n + 2);
      check(cudaMemcpy(got.data(), d, (n + 2) * 2, cudaMemcpyDeviceToHost), "to host");
      cudaFree(d);
      for (int64_t i = 0; i < n + 2; ++i) {
        const bool in = i >= offset && i < offset + n;
        const uint16_t want = in ? f16_to_bf16(codes[i]) : codes[i];
        ASSERT_EQ(got[i], want) << "element " << i << " (f16 0x" << std::hex << codes[i] << ")"
                                << (in ? "" : ": outside the range, must be untouched");
      }
    }
  }
}

// A source [rows, cols] and the slice to take of it.
struct SliceCase {
  int64_t src_rows, src_cols, row_begin, rows, col_begin, cols;
};

TEST(CudaUpload, SlicesAndConversionsMatchCpuBackend) {
  SKIP_WITHOUT_GPU();
  const uint64_t seed = test_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  auto gpu = make_cuda_backend();
  auto cpu = make_cpu_backend();
  const std::vector<SliceCase> cases = {
      {1, 1, 0, 1, 0, 1},
      {7, 19, 1, 5, 3, 15},
      {19, 127, 3, 7, 5, 61},
      {127, 1170, 0, 127, 0, 1170},
      {1170, 7, 1, 1169, 3, 3},
      {1, 39275, 0, 1, 1, 39273},
      {256, 256, 0, 256, 0, 256},        // all 65536 codes below, for F16 sources
      {1170, 39275, 3, 1101, 7, 30001},  // over the 32 MiB staging buffers, several workers
      {5, 39275, 1, 3, 0, 39275},        // whole rows from an odd row
  };
  struct Owned {
    std::vector<uint8_t> src;
    std::unique_ptr<BackendBuffer> on_gpu, on_cpu;
  };
  std::vector<Owned> owned;
  std::vector<HostUpload> gpu_ups, cpu_ups;
  std::vector<std::string> what;
  for (DType from : {DType::kF16, DType::kBF16, DType::kF32}) {
    for (DType to : {DType::kBF16, DType::kF32}) {
      for (const SliceCase& c : cases) {
        const size_t n = static_cast<size_t>(c.src_rows * c.src_cols);
        Owned o;
        o.src = random_bytes(n * dtype_bytes(from), rng);
        if (from == DType::kF16 && c.src_rows == 256 && c.src_cols == 256) {
          for (size_t i = 0; i < n; ++i) {
            const uint16_t h = static_cast<uint16_t>(i);
            std::memcpy(o.src.data() + 2 * i, &h, 2);
          }
        }
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
        const size_t bytes = static_cast<size_t>(c.rows * c.cols) * dtype_bytes(to);
        o.on_gpu = std::make_unique<BackendBuffer>(*gpu, bytes);
        o.on_cpu = std::make_unique<BackendBuffer>(*cpu, bytes);
        u.dst = o.on_gpu->get();
        gpu_ups.push_back(u);
        u.dst = o.on_cpu->get();
        cpu_ups.push_back(u);
        owned.push_back(std::move(o));
        what.push_back(std::string(name_of(from)) + " -> " + name_of(to) + " [" +
                       std::to_string(c.src_rows) + ", " + std::to_string(c.src_cols) + "] rows " +
                       std::to_string(c.row_begin) + "+" + std::to_string(c.rows) + " cols " +
                       std::to_string(c.col_begin) + "+" + std::to_string(c.cols));
      }
    }
  }
  gpu->upload_tensors(gpu_ups);  // all at once, as Model::load does
  cpu->upload_tensors(cpu_ups);
  for (size_t i = 0; i < owned.size(); ++i) {
    const size_t bytes = owned[i].on_cpu->bytes();
    std::vector<uint8_t> got(bytes);
    gpu->download(got.data(), owned[i].on_gpu->get(), bytes);
    const auto* want = static_cast<const uint8_t*>(owned[i].on_cpu->get());
    size_t first_diff = bytes;
    for (size_t b = 0; b < bytes && first_diff == bytes; ++b) {
      if (got[b] != want[b]) first_diff = b;
    }
    EXPECT_EQ(first_diff, bytes) << what[i] << ": first differing byte " << first_diff;
  }
}

TEST(CudaUpload, RefusedBeforeAnythingIsCopied) {
  SKIP_WITHOUT_GPU();
  auto gpu = make_cuda_backend();
  std::vector<uint16_t> src(6 * 5, 0x3c00);
  BackendBuffer dst(*gpu, 6 * 5 * 2);
  gpu->memset(dst.get(), 0, dst.bytes());
  HostUpload good;
  good.src = src.data();
  good.src_dtype = DType::kF16;
  good.dst = dst.get();
  good.dst_dtype = DType::kBF16;
  good.src_rows = good.rows = 6;
  good.src_cols = good.cols = 5;
  HostUpload bad = good;
  bad.col_begin = 1;
  std::string e = "(no error)";
  try {
    gpu->upload_tensors({good, bad});
  } catch (const Error& x) {
    e = x.what();
  }
  EXPECT_NE(e.find("upload 1: cols [1, +5) is not inside [0, 5)"), std::string::npos) << e;
  std::vector<uint16_t> got(6 * 5, 1);
  gpu->download(got.data(), dst.get(), dst.bytes());
  EXPECT_EQ(got, std::vector<uint16_t>(6 * 5, 0)) << "upload 0 was copied before the refusal";
}

}  // namespace
}  // namespace fp8kv
