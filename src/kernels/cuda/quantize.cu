// Quantize-on-write of K/V into the token-slot pool, and Q quantization for fp8-per-head.
// Both write exactly the bytes of their CPU twins: q = e4m3(x / scale) with a true division and
// the saturating hardware convert (bit-identical to fp8kv::quantize_e4m3); for fp8-e5m2 (no
// scales) q = e5m2(x), fp8kv::quantize_e5m2 with scale 1.
#include <algorithm>
#include <climits>

#include "fp8kv/fp8.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/dispatch.h"
#include "kernels/cuda/launchers.h"
#include "kernels/cuda/quantize.h"

namespace fp8kv::cuda {
namespace {

constexpr int kChunk = 16;  // elements per thread per step: two 16-byte bf16 loads
constexpr int kQuantThreads = 256;
// Tokens a thread has in flight: its chunks of the next kAhead tokens are on their way into its
// own shared-memory ring (cp.async) while it converts and stores the current one.
constexpr int kAhead = 2;
constexpr size_t kRingBytes = sizeof(uint4) * 2 * kAhead * kQuantThreads;

// A read of what landed in the thread's own ring, as volatile asm like the wait before it
// (cp_async_wait) and the copy after it (cp_async_16), so that the compiler keeps the three in
// order.
__device__ __forceinline__ uint4 ld_own_v4(const uint4* p) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(smem_addr(p))
               : "memory");
  return v;
}

struct QuantizeKvArgs {
  const uint16_t* kv;    // [T, 2 * Hkv, D] bf16
  const int32_t* slots;  // [T]
  void* cache;           // [num_slots + 1, 2 * Hkv, D] bf16, e4m3 or e5m2
  const float* k_scale;  // per-head [Hkv], per-tensor [1]; unused without scales
  const float* v_scale;
  float* observe_amax;                  // optional [2 * Hkv]
  const unsigned long long* bad_token;  // optional: write nothing unless UINT64_MAX
  DeviceError* error;                   // with bad_token: where a refused write is recorded
  int64_t num_tokens;
  int64_t num_slots;
  int chunks_per_token;  // 2 * Hkv * D / kChunk
  int num_kv_heads;
  int lanes;  // threads in use: a multiple of chunks_per_token
};

// Thread layout. The first `lanes` threads of the grid (a multiple of chunks_per_token) each own
// one chunk c = thread % chunks_per_token of every token t = thread / chunks_per_token + k * rows
// (rows = lanes / chunks_per_token): 16 elements of one head, as two 8-element vectors half a head
// apart (u = c % kGroup: elements 8u..8u+7 and D/2 + 8u..+7 of head c / kGroup), so that each
// load and store instruction of a warp covers whole 32-byte sectors (the kGroup lanes of a head
// read its first half, then its second). A thread's head, scale and share of the observation are
// thus fixed: the divider is set up once, the abs-max stays in a register and is reduced once at
// the end, and the only per-token index arithmetic is an add. The loads go through a ring in
// shared memory that only the thread itself reads: its next kAhead tokens' chunks (2 kAhead
// 16-byte copies) and their slots are in flight while it converts the current token, whatever its
// register count (the loads in registers, two tokens a step, held 80 registers, three CTAs an SM).
template <KvScheme kScheme, int kHeadDim>
__global__ void __launch_bounds__(kQuantThreads) quantize_kv_kernel(const QuantizeKvArgs a) {
  constexpr int kGroup = kHeadDim / kChunk;  // lanes per (token, head): 4, 8, 16
  static_assert(kHeadDim % kChunk == 0 && 32 % kGroup == 0, "head_dim");
  constexpr KvCodec kCodec = kv_codec(kScheme);
  constexpr KvScaleSource kScales = kv_scale_source(kScheme);
  constexpr int kHalf = kHeadDim / 2;  // elements between a thread's two vectors
  extern __shared__ __align__(16) uint8_t s_dyn[];
  uint4* const ring = reinterpret_cast<uint4*>(s_dyn);  // [kAhead][2][kQuantThreads]
  uint32_t* const s_amax = reinterpret_cast<uint32_t*>(s_dyn + kRingBytes);  // [2 * Hkv]
  // A programmatic dependent launch (launch_quantize_kv): the next write may start its CTAs as
  // this one's retire, and this one reads nothing before the kernel before it has finished (it
  // may have made the K/V, the slots or the bad-token word).
  griddep_launch_dependents();
  griddep_wait();
  if (a.bad_token != nullptr) {
    const unsigned long long bad = *a.bad_token;
    if (bad != ULLONG_MAX) {
      // Refused: nothing written. The first refusal not yet read by the host is recorded.
      if (blockIdx.x == 0 && threadIdx.x == 0) {
        record_device_error(a.error, DeviceErrorKind::kQuantizeSlot, bad, a.slots[bad],
                            a.num_slots);
      }
      return;
    }
  }
  const int heads2 = 2 * a.num_kv_heads;
  const bool observe = a.observe_amax != nullptr;
  if (observe) {
    for (int i = threadIdx.x; i < heads2; i += blockDim.x) s_amax[i] = 0;
    __syncthreads();
  }
  const int thread = blockIdx.x * blockDim.x + threadIdx.x;
  const int cpt = a.chunks_per_token;
  const int chunk = thread % cpt;
  const int head = chunk / kGroup;  // 0..2*Hkv-1: K heads then V heads
  const int64_t rows = a.lanes / cpt;
  const bool is_v = head >= a.num_kv_heads;
  float scale = 1.0f;  // fp8-e5m2 (no scales): x / 1 is x
  if constexpr (kScales != KvScaleSource::kNone) {
    const int scale_head =
        kScales == KvScaleSource::kPerHead ? (is_v ? head - a.num_kv_heads : head) : 0;
    scale = is_v ? a.v_scale[scale_head] : a.k_scale[scale_head];
  }
  uint32_t amax2 = 0;  // the observed |x| bits, two bf16 halves kept apart
  const int64_t row_elems = static_cast<int64_t>(cpt) * kChunk;  // 2 * Hkv * D
  const int elem0 = head * kHeadDim + (chunk % kGroup) * 8;      // the first vector in a token row
  if (thread < a.lanes) {
    const uint16_t* src = a.kv + elem0;
    const int64_t t0 = thread / cpt;
    uint4* const mine = ring + threadIdx.x;  // stage s: mine[2 s kQuantThreads], + kQuantThreads
    int32_t slot[kAhead];                    // the slots of the tokens in the ring, by stage
    // Token t's chunk into stage s (nothing past the end), as one commit group either way, so
    // that waiting for all but the kAhead - 1 newest groups means the oldest stage has landed.
    auto fetch = [&](int s, int64_t t) {
      if (t < a.num_tokens) {
        const uint16_t* p = src + t * row_elems;
        slot[s] = a.slots[t];
        cp_async_16(mine + 2 * s * kQuantThreads, p, 16);
        cp_async_16(mine + (2 * s + 1) * kQuantThreads, p + kHalf, 16);
      }
      cp_async_commit();
    };
#pragma unroll
    for (int s = 0; s < kAhead; ++s) fetch(s, t0 + s * rows);
    // The divider after the first copies are on their way: its reciprocal waits for the scale's
    // load, which then overlaps theirs.
    const ScaleDivider div(scale);
    // One token's chunk, loaded as v0 (elements elem0..+7) and v1 (elem0 + D/2..+7): written at
    // its slot.
    auto store = [&](int64_t slot, uint4 v0, uint4 v1) {
      const int64_t dst_elem = slot * row_elems + elem0;
      if constexpr (kCodec == KvCodec::kBf16) {
        uint16_t* dst = static_cast<uint16_t*>(a.cache) + dst_elem;
        st_v4(dst, v0);
        st_v4(dst + kHalf, v1);
      } else {
        // One 8-element vector at a time (widen, divide, pack, store): one vector's floats live.
        uint8_t* dst = static_cast<uint8_t*>(a.cache) + dst_elem;
        auto convert = [&](const uint4 v, uint8_t* out) {
          float f[8], q[8];
          widen_bf16x8(v, f);
          div.divide(f, q);
          uint32_t packed[2];
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            const uint16_t lo = float2_to_fp8x2_hw<kCodec>(q[4 * i], q[4 * i + 1]);
            const uint16_t hi = float2_to_fp8x2_hw<kCodec>(q[4 * i + 2], q[4 * i + 3]);
            packed[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
          }
          *reinterpret_cast<uint2*>(out) = make_uint2(packed[0], packed[1]);
        };
        convert(v0, dst);
        convert(v1, dst + kHalf);
      }
      if (observe) {
        // |x| of each bf16 (its bits without the sign: ordered as the values, NaN above infinity),
        // two at a time as unsigned 16-bit maxima.
        const uint32_t w[8] = {v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w};
#pragma unroll
        for (int i = 0; i < 8; ++i) amax2 = __vmaxu2(amax2, w[i] & 0x7fff7fffu);
      }
    };
    for (int64_t t = t0; t < a.num_tokens; t += kAhead * rows) {
#pragma unroll
      for (int s = 0; s < kAhead; ++s) {
        const int64_t ts = t + s * rows;
        if (ts >= a.num_tokens) break;
        cp_async_wait<kAhead - 1>();
        const uint4 v0 = ld_own_v4(mine + 2 * s * kQuantThreads);
        const uint4 v1 = ld_own_v4(mine + (2 * s + 1) * kQuantThreads);
        store(slot[s], v0, v1);
        // The store above consumed the stage's values, so its refill cannot overtake their read.
        fetch(s, ts + kAhead * rows);
      }
    }
  }
  if (observe) {
    // The kGroup lanes of a (token, head) are aligned lanes of one warp (cpt is a multiple of
    // kGroup and kGroup divides 32), so they share `head`: reduce them, then one shared atomic per
    // group and one global atomic per head and block.
    // The larger half as a float's bits (widening a bf16 is exact).
    uint32_t amax = max(amax2 << 16, amax2 & 0xffff0000u);
    amax = warp_max_bits<kGroup>(amax);
    if (amax != 0 && threadIdx.x % kGroup == 0) atomicMax(&s_amax[head], amax);
    __syncthreads();
    for (int i = threadIdx.x; i < heads2; i += blockDim.x) {
      if (s_amax[i] != 0) atomic_max_abs_bits(a.observe_amax + i, s_amax[i]);
    }
  }
}

__global__ void check_slots_kernel(const int32_t* slots, int64_t num_tokens, int64_t num_slots,
                                   unsigned long long* bad_token) {
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < num_tokens;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t s = slots[t];
    if (s < 0 || s >= num_slots) atomicMin(bad_token, static_cast<unsigned long long>(t));
  }
}

// Q for fp8-per-head: one CTA per (request b, KV head g). The group's Hq/Hkv heads of one token
// are contiguous ([G * D] elements), so the CTA walks q_len contiguous spans: a first pass for the
// abs-max (skipped with a static scale unless observe_amax asks for it), a second to write
// e4m3(x / s).
constexpr int kQThreads = 256;

__global__ void __launch_bounds__(kQThreads) quantize_q_kernel(const QuantizeQParams p) {
  const int b = blockIdx.x / p.num_kv_heads;
  const int g = blockIdx.x % p.num_kv_heads;
  const int group = p.num_q_heads / p.num_kv_heads;
  const int span = group * p.head_dim;  // elements per token, a multiple of 8
  const int span8 = span / 8;
  const int64_t t0 = p.cu_seqlens_q[b], t1 = p.cu_seqlens_q[b + 1];
  const int64_t n8 = (t1 - t0) * span8;
  auto elem_offset = [&](int64_t i8) {
    const int64_t t = t0 + i8 / span8;
    const int j = static_cast<int>(i8 % span8) * 8;
    return (t * p.num_q_heads + static_cast<int64_t>(g) * group) * p.head_dim + j;
  };
  __shared__ float s_scale;
  __shared__ uint32_t s_red[kQThreads / 32];
  if (p.static_scale != nullptr && threadIdx.x == 0) s_scale = p.static_scale[g];
  if (p.static_scale == nullptr || p.observe_amax != nullptr) {
    uint32_t amax = 0;
    for (int64_t i8 = threadIdx.x; i8 < n8; i8 += blockDim.x) {
      const uint4 v = ld_nc_v4(p.q + elem_offset(i8));
      const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
        amax = max(amax, max((w[i] << 16) & 0x7fff0000u, w[i] & 0x7fff0000u));
    }
    amax = warp_max_bits(amax);
    if (threadIdx.x % 32 == 0) s_red[threadIdx.x / 32] = amax;
    __syncthreads();
    if (threadIdx.x == 0) {
      uint32_t m = 0;
      for (int w = 0; w < kQThreads / 32; ++w) m = max(m, s_red[w]);
      if (p.static_scale == nullptr) {
        const float s = __uint_as_float(m) / kE4m3Max;
        s_scale = s == 0.0f ? 1.0f : s;
      }
      if (p.observe_amax != nullptr && m != 0) atomic_max_abs_bits(p.observe_amax + g, m);
    }
  }
  __syncthreads();
  const float scale = s_scale;
  if (threadIdx.x == 0) p.q_scale[static_cast<int64_t>(b) * p.num_kv_heads + g] = scale;
  const ScaleDivider div(scale);
  for (int64_t i8 = threadIdx.x; i8 < n8; i8 += blockDim.x) {
    const int64_t off = elem_offset(i8);
    float f[8], q[8];
    widen_bf16x8(ld_nc_v4(p.q + off), f);
    div.divide(f, q);
    uint32_t packed[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const uint16_t lo = float2_to_e4m3x2_hw(q[4 * i], q[4 * i + 1]);
      const uint16_t hi = float2_to_e4m3x2_hw(q[4 * i + 2], q[4 * i + 3]);
      packed[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
    *reinterpret_cast<uint2*>(p.q_fp8 + off) = make_uint2(packed[0], packed[1]);
  }
}

}  // namespace

void launch_check_slots(const QuantizeKvParams& p, unsigned long long* bad_token,
                        cudaStream_t stream) {
  FP8KV_CUDA_CHECK(cudaMemsetAsync(bad_token, 0xff, sizeof *bad_token, stream));
  if (p.num_tokens == 0) return;
  const int threads = 256;
  const int blocks =
      static_cast<int>(std::min<int64_t>((p.num_tokens + threads - 1) / threads, 1024));
  check_slots_kernel<<<blocks, threads, 0, stream>>>(p.slots, p.num_tokens, p.cache.num_slots,
                                                     bad_token);
  FP8KV_CUDA_CHECK_LAUNCH("check_slots_kernel");
}

void launch_quantize_kv(const QuantizeKvParams& p, const unsigned long long* bad_token,
                        DeviceError* error, cudaStream_t stream) {
  if (p.num_tokens == 0) return;
  const int D = p.cache.head_dim;
  const int chunks_per_token = 2 * p.cache.num_kv_heads * D / kChunk;
  QuantizeKvArgs a;
  a.kv = p.kv;
  a.slots = p.slots;
  a.cache = p.cache.data;
  a.k_scale = p.scales.k;
  a.v_scale = p.scales.v;
  a.observe_amax = p.observe_amax;
  a.bad_token = bad_token;
  a.error = error;
  a.num_slots = p.cache.num_slots;
  a.num_tokens = p.num_tokens;
  a.chunks_per_token = chunks_per_token;
  a.num_kv_heads = p.cache.num_kv_heads;
  const size_t smem =
      kRingBytes + (p.observe_amax ? sizeof(uint32_t) * 2 * p.cache.num_kv_heads : 0);
  FP8KV_DISPATCH_SCHEME(p.cache.scheme, kScheme, [&] {
    FP8KV_DISPATCH_HEAD_DIM(D, kHeadDim, [&] {
      auto* kernel = quantize_kv_kernel<kScheme, kHeadDim>;
      // Resident blocks an SM, with room for 256 observed heads' maxima (a launch that observes
      // more has a few blocks in a second wave).
      static const int per_sm = [&] {
        int v = 0;
        FP8KV_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
            &v, kernel, kQuantThreads, kRingBytes + sizeof(uint32_t) * 256));
        return v < 1 ? 1 : v;
      }();
      // One wave of resident blocks (each thread then takes several tokens), fewer for a small
      // write, at least one token's chunks; the threads in use are a whole number of tokens.
      const int64_t want = (p.num_tokens * chunks_per_token + kQuantThreads - 1) / kQuantThreads;
      const int blocks = static_cast<int>(std::max<int64_t>(
          std::min<int64_t>(want, static_cast<int64_t>(device_sm_count()) * per_sm),
          ceil_div(chunks_per_token, kQuantThreads)));
      a.lanes = blocks * kQuantThreads / chunks_per_token * chunks_per_token;
      // As a programmatic dependent of the kernel before it (the kernel waits for it before any
      // read, griddep_wait): its launch and its CTAs' start overlap that kernel's tail.
      const OneAttributeLaunch launch(dim3(blocks), kQuantThreads, smem, stream,
                                      OneAttributeLaunch::ProgrammaticDependent{});
      FP8KV_CUDA_CHECK(cudaLaunchKernelEx(&launch.config, kernel, a));
    });
  });
  FP8KV_CUDA_CHECK_LAUNCH("quantize_kv_kernel");
}

void launch_quantize_kv(const QuantizeKvParams& p, cudaStream_t stream) {
  launch_quantize_kv(p, nullptr, nullptr, stream);
}

void launch_quantize_q(const QuantizeQParams& p, cudaStream_t stream) {
  if (p.num_requests == 0) return;
  quantize_q_kernel<<<p.num_requests * p.num_kv_heads, kQThreads, 0, stream>>>(p);
  FP8KV_CUDA_CHECK_LAUNCH("quantize_q_kernel");
}

}  // namespace fp8kv::cuda
