// The bare bulk-copy ring of bench/ring_bench.h. Items of item_kb bytes, dealt round-robin
// (CTA c takes items c, c + ctas, ...): (request, part, chunk of the request's tokens). Producer
// warps issue each tile's copies into the next free stage (lanes < `lanes` of each, one copy after
// another), completing on the stage's `full` mbarrier; one consumer warp waits for each stage,
// holds it hold_ns (an item's last stage stall_ns more) and releases it on its `empty` mbarrier.
#include <string>

#include "bench/ring_bench.h"
#include "fp8kv/error.h"
#include "kernels/cuda/check.h"
#include "kernels/cuda/common.cuh"

namespace fp8kv {
namespace {

using namespace cuda;

__device__ __forceinline__ void spin_ns(int ns) {
  if (ns <= 0) return;
  const uint64_t t0 = global_timer_ns();
  while (global_timer_ns() - t0 < static_cast<uint64_t>(ns)) {
  }
}

__global__ void ring_bench_kernel(const RingBenchParams p) {
  extern __shared__ __align__(128) uint8_t smem[];
  const RingShape sh = p.shape;
  const uint32_t base = smem_addr(smem);
  const uint32_t full = base + sh.stages * sh.stage_bytes, empty = full + 8 * sh.stages;
  const int copies = sh.tile_tokens * (sh.kv_split ? 2 : 1);  // per tile
  if (static_cast<int>(threadIdx.x) < sh.stages) {
    mbarrier_init(full + 8 * threadIdx.x, copies);
    mbarrier_init(empty + 8 * threadIdx.x, 1);
  }
  fence_barrier_init();
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int item_tokens = (p.item_kb << 10) / (copies / sh.tile_tokens * sh.copy_bytes);
  const int chunks = p.tokens / item_tokens;
  const int items = p.requests * sh.parts * chunks;
  const int tiles = item_tokens / sh.tile_tokens;
  if (warp < sh.producers) {
    const uint64_t policy = l2_evict_first_policy();
    uint32_t use = 0;
    for (int item = blockIdx.x; item < items; item += gridDim.x) {
      const int r = item / (sh.parts * chunks), part = item / chunks % sh.parts,
                chunk = item % chunks;
      for (int t = 0; t < tiles; ++t, ++use) {
        const int s = use % sh.stages;
        if (use >= static_cast<uint32_t>(sh.stages))
          mbarrier_wait(empty + 8 * s, (use / sh.stages - 1) & 1);
        if (lane >= sh.lanes) continue;
        for (int c = warp * sh.lanes + lane; c < copies; c += sh.producers * sh.lanes) {
          const int tok = c % sh.tile_tokens, v = c / sh.tile_tokens;
          const int64_t token =
              static_cast<int64_t>(r) * p.tokens + chunk * item_tokens + t * sh.tile_tokens + tok;
          const uint8_t* src = p.pool + token * p.row_bytes +
                               (sh.kv_split ? v * (p.row_bytes / 2) + part * sh.copy_bytes : 0);
          mbarrier_arrive_expect_tx(full + 8 * s, sh.copy_bytes);
          bulk_copy_g2s(base + s * sh.stage_bytes + c * sh.copy_bytes, src, sh.copy_bytes,
                        full + 8 * s, policy);
        }
      }
    }
  } else if (warp == sh.producers) {
    uint32_t use = 0;
    for (int item = blockIdx.x; item < items; item += gridDim.x) {
      for (int t = 0; t < tiles; ++t, ++use) {
        const int s = use % sh.stages;
        mbarrier_wait(full + 8 * s, (use / sh.stages) & 1);
        spin_ns(p.hold_ns + (t == tiles - 1 ? p.stall_ns : 0));
        __syncwarp();
        if (lane == 0) mbarrier_arrive(empty + 8 * s);
      }
    }
  }
}

}  // namespace

void launch_ring_bench(const RingBenchParams& p, int ctas, cudaStream_t stream) {
  const RingShape& sh = p.shape;
  const int per_token = sh.kv_split ? 2 : 1;
  const int copies = sh.tile_tokens * per_token;
  const int token_bytes = per_token * sh.copy_bytes;
  auto refuse = [](const std::string& why) { throw Error("ring bench: " + why); };
  if (copies * sh.copy_bytes != sh.stage_bytes)
    refuse("a stage is not tile_tokens tokens of copies");
  if (sh.copy_bytes % 16 != 0) refuse("copy_bytes is not a multiple of 16");
  if (sh.kv_split ? 2 * sh.parts * sh.copy_bytes != p.row_bytes
                  : sh.parts != 1 || sh.copy_bytes != p.row_bytes) {
    refuse("the parts' copies do not cover a slot row");
  }
  const int64_t item_bytes = int64_t{p.item_kb} << 10;
  if (item_bytes % sh.stage_bytes != 0 || p.tokens % (item_bytes / token_bytes) != 0) {
    refuse("an item is not whole tiles of a request's tokens");
  }
  if (sh.stages < 2 || sh.producers < 1 || sh.lanes < 1 || sh.lanes > 32)
    refuse("stages, producers or lanes");
  const int smem = sh.stages * (sh.stage_bytes + 16);
  FP8KV_CUDA_CHECK(
      cudaFuncSetAttribute(ring_bench_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  ring_bench_kernel<<<ctas, 32 * (sh.producers + 1), smem, stream>>>(p);
  FP8KV_CUDA_CHECK_LAUNCH("ring_bench_kernel");
}

}  // namespace fp8kv
