// A bare bulk-copy ring (bench/ring_bench.cu, `fp8kv bench kernels --only ring`): how fast one
// CTA per SM streams a decode-like gather through a ring of mbarrier stages, with no slot table,
// softmax or merge, by copy size, stage count and size, producer warps and how long a consumer
// holds a stage. It bounds what the persistent decode kernel's ring can reach (docs/GPU.md,
// twenty-seventh session) and measures a ring shape before a kernel is built around it.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fp8kv {

// The ring's shape: how a stage is gathered and how deep the ring is.
struct RingShape {
  int copy_bytes;   // one bulk copy
  int tile_tokens;  // tokens a stage holds
  int parts;        // items per (request, token chunk): the row's head groups
  bool kv_split;    // each token gives a K copy (part * copy_bytes) and a V copy (row / 2 + that);
                    // otherwise one copy of the whole row (parts 1)
  int stages, stage_bytes;
  int producers, lanes;  // producer warps and the lanes of each that issue copies
};

struct RingBenchParams {
  const uint8_t* pool;   // [requests * tokens, row_bytes]: slot rows, a request's tokens adjacent
  int row_bytes;         // one token's slot row (K then V of every head)
  int requests, tokens;  // tokens per request
  RingShape shape;
  int item_kb;   // bytes an item reads (a whole number of tiles)
  int hold_ns;   // how long the consumer holds each stage (its compute)
  int stall_ns;  // and an item's last stage before it releases it (an epilogue)
};

// Bytes the launch reads: requests * tokens * row_bytes.
inline int64_t ring_bench_bytes(const RingBenchParams& p) {
  return static_cast<int64_t>(p.requests) * p.tokens * p.row_bytes;
}
// One launch of `ctas` CTAs (one per SM: the dynamic shared memory is the whole ring). Throws
// Error on a shape it cannot run (copies that do not tile a stage or an item).
void launch_ring_bench(const RingBenchParams& p, int ctas, cudaStream_t stream);

}  // namespace fp8kv
