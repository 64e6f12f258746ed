// The prefill kernel's wgmma descriptors of a tile's k-steps are the first one's plus the step's
// byte offset (wgmma_desc_plus, kernels/cuda/prefill_wgmma_ops.cuh): an add in the descriptor's
// low word, which holds only while the address field cannot carry into the next one. Checked on
// the host against each descriptor built from its own address, for every 16-byte-aligned address
// of an SM's shared memory and the offsets the kernel steps by, in the three descriptor forms
// it uses (no swizzle, 128-byte swizzle K-major and MN-major). Needs no GPU.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdio>

#include "kernels/cuda/prefill_wgmma_ops.cuh"

namespace fp8kv::cuda::prefill {
namespace {

TEST(WgmmaDescriptor, PlusOffsetEqualsTheDescriptorOfTheOffsetAddress) {
  constexpr uint32_t kSharedBytes = 228 * 1024;  // the most shared memory an sm_90 SM has
  // k-steps: 32 bytes (e4m3 k32, 16-bit k16 rows), core matrices (2 x 128), 16-bit V k-steps of
  // 2 x kKBlockStride, swizzle column blocks (kBlockM or kBlockN x 128) and MN-major k-steps
  // (2048); and the largest offset a tile's k-steps reach.
  const uint32_t offsets[] = {0,    16,   32,   64,    96,    256,   512,   1024, 2048,
                              4096, 6144, 8192, 16384, 24576, 32768, 49152, 57344};
  uint64_t checked = 0, mismatches = 0;
  for (uint32_t address = 0; address < kSharedBytes; address += 16) {
    for (const uint32_t offset : offsets) {
      if (address + offset >= kSharedBytes) continue;
      const uint32_t to = address + offset;
      const bool same =
          wgmma_desc_plus(wgmma_desc_sw128(address), offset) == wgmma_desc_sw128(to) &&
          wgmma_desc_plus(wgmma_desc_sw128_mn(address, 16384), offset) ==
              wgmma_desc_sw128_mn(to, 16384) &&
          wgmma_desc_plus(wgmma_desc(address, kCoreBytes, 2048), offset) ==
              wgmma_desc(to, kCoreBytes, 2048);
      ++checked;
      if (!same && mismatches++ == 0) {
        ADD_FAILURE() << "first mismatch: address " << address << " + " << offset;
      }
    }
  }
  EXPECT_EQ(mismatches, 0u) << "of " << checked;
  EXPECT_GT(checked, 200000u);
  // Past the field (an address of 2^18 and more) the add would carry into the leading byte
  // offset: the identity is the shared window's, which the check above covers.
  EXPECT_NE(wgmma_desc_plus(wgmma_desc_sw128((1u << 18) - 16), 16), wgmma_desc_sw128(1u << 18));
}

}  // namespace
}  // namespace fp8kv::cuda::prefill
