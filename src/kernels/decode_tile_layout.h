// Where the decode kernels' tiles sit in shared memory (decode_mma_kernel.cuh): the copy engine
// lands every K or V row of a tile dense, rows `copy_bytes` apart, in its 128-byte swizzle, and
// the consumers' ldmatrix rows follow it. Pure arithmetic for host and device, unit-tested
// against the swizzle's definition in tests/kernels/decode_tile_layout_test.cpp (no GPU needed).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FP8KV_TILE_HD __host__ __device__ __forceinline__
#else
#define FP8KV_TILE_HD inline
#endif

namespace fp8kv::cuda {

// The 128-byte swizzle: the 16-byte chunk c of the 128-byte line at address L (a multiple of 128)
// sits at chunk c ^ ((L >> 7) & 7) of that line. The pattern follows the shared-memory address,
// not the box's start, so a box of 32 rows and a box of one row place a row alike (the tests on
// the GPU: scattered slots, every row its own box, against the CPU twin).
FP8KV_TILE_HD uint32_t swizzle128(uint32_t addr) { return addr ^ (((addr >> 7) & 7u) << 4); }

// A lane's ldmatrix reads row `row` of a tile whose rows start at `stage0` (rows `copy_bytes`
// apart, a multiple of 128), from byte `col0` of the row on (its head's part, plus 16 for the
// upper two matrices) and then every 16 * j bytes on (j even, from 0). w[p] = the address for
// j = 0 in the p-th 128-byte line of the head's part, so that the address for j is
// tile_addr(w, j) = w[j / 8] ^ 16 (j % 8): one XOR a load. That holds while j % 8 never carries
// into col0's chunk bits: col0's chunk (col0 / 16 % 8) is 0 or 1 where a head's row fills whole
// lines, 4 (+1) at most with j < 4 at 64-byte rows.
template <int kPieces>
FP8KV_TILE_HD void tile_row_bases(uint32_t stage0, int row, int col0, int copy_bytes,
                                  uint32_t (&w)[kPieces]) {
  for (int p = 0; p < kPieces; ++p) {  // unrolled: kPieces is 1, 2 or 4
    const int col = col0 + 128 * p;
    const uint32_t line = stage0 + static_cast<uint32_t>(row * copy_bytes + (col & ~127));
    w[p] = line | (16u * ((static_cast<uint32_t>(col >> 4) & 7u) ^ ((line >> 7) & 7u)));
  }
}
// The ldmatrix address of chunk offset j (even; a constant of an unrolled loop).
template <int kPieces>
FP8KV_TILE_HD uint32_t tile_addr(const uint32_t (&w)[kPieces], int j) {
  return w[j / 8] ^ (16u * (j % 8));
}

}  // namespace fp8kv::cuda
