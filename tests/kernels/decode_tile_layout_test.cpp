// The decode kernels' shared-memory tile addressing (kernels/decode_tile_layout.h) against the
// copy engine's 128-byte swizzle as the PTX ISA defines it: for every tile shape the kernels
// instantiate, every lane's ldmatrix row, every k-step's chunk, the K and the V rows and later
// stages, tile_addr gives the address where the swizzle put the byte the lane wants. Host code.
#include <gtest/gtest.h>

#include <cstdint>
#include <string>

#include "kernels/decode_tile_layout.h"

namespace fp8kv {
namespace {

// The swizzle from its definition: line L = addr / 128, the 16-byte chunk c = addr / 16 % 8 of it
// stored at chunk c ^ (L % 8).
uint32_t swizzled(uint32_t addr) {
  const uint32_t line = addr / 128, chunk = addr / 16 % 8;
  return line * 128 + ((chunk ^ (line % 8)) * 16) + addr % 16;
}

TEST(DecodeTileLayout, SwizzleIsTheDefinitionAndAPermutationOfEachPattern) {
  for (uint32_t a = 0; a < 8192; a += 16) EXPECT_EQ(cuda::swizzle128(a), swizzled(a)) << a;
  for (uint32_t base : {0u, 1024u * 5}) {
    bool seen[64] = {};
    for (uint32_t a = base; a < base + 1024; a += 16) {
      const uint32_t s = cuda::swizzle128(a);
      ASSERT_GE(s, base);
      ASSERT_LT(s, base + 1024);
      EXPECT_FALSE(seen[(s - base) / 16]) << "two chunks at " << s;
      seen[(s - base) / 16] = true;
    }
  }
}

// One tile shape: bytes of a KV head's row, heads a row (a copy), the 128-byte lines of a head's
// row a lane reads (kPieces).
template <int kPieces>
void check_shape(int row_bytes, int heads) {
  const int copy_bytes = row_bytes * heads;
  const int stage_bytes = 2 * 64 * copy_bytes;  // 64 K rows, then 64 V rows
  const int v_offset = 64 * copy_bytes;
  SCOPED_TRACE("row_bytes=" + std::to_string(row_bytes) + " heads=" + std::to_string(heads));
  ASSERT_EQ(copy_bytes % 128, 0);
  ASSERT_EQ(stage_bytes % 1024, 0);
  for (uint32_t stage0 : {0u, 1024u * 37}) {
    for (int row = 0; row < 64; ++row) {
      for (int sub = 0; sub < heads; ++sub) {
        for (int c0 = 0; c0 < 2; ++c0) {
          const int col0 = sub * row_bytes + 16 * c0;
          uint32_t w[kPieces];
          cuda::tile_row_bases(stage0, row, col0, copy_bytes, w);
          for (int j = 0; c0 + j < row_bytes / 16; j += 2) {
            for (int stage = 0; stage < 3; ++stage) {
              const uint32_t off = static_cast<uint32_t>(stage * stage_bytes);
              const uint32_t k_byte = stage0 + off + row * copy_bytes + col0 + 16 * j;
              ASSERT_EQ(cuda::tile_addr(w, j) + off, swizzled(k_byte))
                  << "K row " << row << " head " << sub << " c0 " << c0 << " j " << j;
              ASSERT_EQ(cuda::tile_addr(w, j) + off + v_offset, swizzled(k_byte + v_offset))
                  << "V row " << row << " head " << sub << " c0 " << c0 << " j " << j;
            }
          }
        }
      }
    }
  }
}

// The shapes of decode_mma_kv_heads / decode_persistent_kv_heads (decode.cuh): e4m3 at head_dim
// 64 (four heads), 128 (two, the persistent kernel too), 256 (two); bf16 at 64 and 128 (two),
// 256 (one); and four heads of 128 bytes (the persistent kernel's e4m3 items before the
// thirty-third session), so that a return to them is covered.
TEST(DecodeTileLayout, EveryLaneReadsTheByteTheSwizzlePutThere) {
  check_shape<1>(64, 4);
  check_shape<1>(128, 2);
  check_shape<1>(128, 4);
  check_shape<2>(256, 2);
  check_shape<4>(512, 1);
}

}  // namespace
}  // namespace fp8kv
