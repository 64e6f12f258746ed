// Prefill attention, host side: the tile configurations the kernel is built in and the launcher
// that picks one. Plain C++ (no device code), so host-only tests and benchmarks can include it.
//
// launchers.h's launch_prefill_attention(p, stream) uses PrefillConfig::kDefault; the others stay
// selectable so a benchmark can show what each tile shape buys and a regression can be bisected.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "fp8kv/backend.h"
#include "kernels/cuda/device_error.h"

namespace fp8kv::cuda {

enum class PrefillConfig {
  kDefault,  // the tuned choice per (scheme, head_dim): fp8-per-head kWsSwizzle for D = 128,
             // kWarpSpecialized for D = 64 and 256, kWsPersistent for even batches of short
             // requests at D = 64 and 128; the bf16-Q schemes kWsSwizzle (16-bit operands;
             // for the FP8 ones K/V widened to f16 by the producer), the widened ones
             // kWsPersistent at D = 64 and 128; fp8-per-tensor at D = 128 (e4m3 operands,
             // its Q split in two) fp8-per-head's choice for causal batches, else kWsSwizzle
  // Warp-specialized wgmma (prefill_ws.cuh): a producer warpgroup and two consumer warpgroups;
  // fp8-per-head with e4m3 operands in the plain layout, 128 keys per tile (64 for D = 256).
  // (The bf16-Q schemes' plain-layout instances are retired: their 16-bit operands are swizzled,
  // kWsSwizzle; asking for this config with them throws.)
  kWarpSpecialized,
  kWsSwizzle,     // operands in the 128-byte swizzle layout, whole-row copies: fp8-per-head
                  // D = 128, the bf16-Q schemes D = 64, 128 and 256
  kWsPersistent,  // fp8-per-head's default kernel at D = 64 and 128 as persistent CTAs (one
                  // per SM walking the items, where the requests' new-token counts are
                  // equal; one CTA per item otherwise): the default for such batches of
                  // short requests (prefill.cu); and the widened schemes' kWsSwizzle
                  // kernels so, their default (kDefault above)
  // Benchmark diagnostics of kWarpSpecialized, D = 128 (wrong results by design, never tested):
  kWsDiagConsumers,  // the producer loads only the first tiles: the consumers' bound
  kWsDiagProducer,   // the consumers skip their math: the producer's bound
};

// Every request of the batch has the same number of new tokens: where the warp-specialized
// kernel's persistent instances run persistent CTAs (prefill_item_grid) and the dispatcher's
// choices between instances (prefill.cu).
inline bool even_batch(const AttentionParams& p) {
  return p.batch.total_q == static_cast<int64_t>(p.batch.num_requests) * p.batch.max_q_len;
}

const char* prefill_config_name(PrefillConfig config);

// Enqueues the varlen prefill of `p` (validated by the caller; causal or not: p.causal) on
// `stream`. Throws Error("Unsupported head_dim N") for head dims other than 64/128/256, and Error
// for a config that is not built for the scheme and head_dim.
void launch_prefill_attention(const AttentionParams& p, PrefillConfig config, cudaStream_t stream,
                              DeviceError* error = nullptr);

// The prefill timeline (a diagnostic build only, CMake FP8KV_PREFILL_TIMELINE): the
// warp-specialized kernel's CTA (0, 0, 0) (query head 0 of request 0, its last query tile: the
// most key tiles) writes %clock stamps (32-bit SM cycles) into set_prefill_timeline's buffer
// during the next launches, [role][tile][event], role 0 = the producer, 1 and 2 = the consumer
// warpgroups (lane 0 of each warpgroup's first warp); entries it does not reach keep their
// values; null stops. Events, producer: kTlTop (iteration j begins), kTlEmptyWait (before the
// wait for tile j's stage), kTlEmptyDone, kTlIssued (tile j's loads issued), and for the tile it
// finishes kTlLanded (the stamping thread's loads of it complete), kTlBarrier (the producer's
// named barrier passed), kTlTransformed (V transposed or K/V widened), kTlPublished (its `full`
// barrier arrived on). Consumers, tile j: kTlTop (before the wait for `full`), kTlFull,
// kTlIssued (QK(j) and PV(j-1) issued), kTlScores (S(j) landed), kTlSoftmax (softmax done), kTlPv
// (PV(j-1) landed), kTlPacked (O promoted, P packed: the iteration's end). bench kernels
// summarizes them. The events are declared in every build (the kernel names them; its stamps
// compile to nothing without the option).
enum PrefillTimelineEvent {
  kTlTop,
  kTlEmptyWait,
  kTlEmptyDone,
  kTlIssued,
  kTlLanded,
  kTlBarrier,
  kTlTransformed,
  kTlPublished,
  kTlFull = kTlEmptyWait,
  kTlScores = kTlLanded,
  kTlSoftmax = kTlBarrier,
  kTlPv = kTlTransformed,
  kTlPacked = kTlPublished,
};
constexpr int kPrefillTimelineEvents = 8;
constexpr int kPrefillTimelineTiles = 1024;  // tiles past this are not stamped
constexpr int kPrefillTimelineRoles = 3;
#ifdef FP8KV_PREFILL_TIMELINE
void set_prefill_timeline(uint32_t* buffer);
#endif

}  // namespace fp8kv::cuda
