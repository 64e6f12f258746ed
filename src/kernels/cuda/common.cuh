// Device building blocks shared by the CUDA kernels: 16-byte vector access, cp.async, FP8/bf16
// widening in registers, warp reductions, and the float-as-bits atomic max used by the fused
// abs-max observation. Conversions to e4m3/e5m2 use cuda_fp8.h's hardware instructions, which are
// bit-identical to fp8kv/fp8.h (saturating, NaN -> 0x7f); tests/cuda/codec_test.cu proves it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "fp8kv/error.h"
#include "fp8kv/scheme.h"
#include "kernels/cuda/check.h"

namespace fp8kv::cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr unsigned kFullMask = 0xffffffffu;

// x as lane 0 of the warp holds it: the same value, but one that ptxas knows to be the same
// across the warp, so that what derives from it (loop bounds, shared-memory descriptors) can
// live in uniform registers.
__device__ __forceinline__ int warp_uniform(int x) { return __shfl_sync(kFullMask, x, 0); }

// ---- memory access ------------------------------------------------------------------------

// Read-only 16-byte load through the non-coherent path (data not written by this kernel).
__device__ __forceinline__ uint4 ld_nc_v4(const void* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}
// Streaming 16-byte load: evict-first, the data is used once.
__device__ __forceinline__ uint4 ld_stream_v4(const void* p) {
  return __ldcs(reinterpret_cast<const uint4*>(p));
}
__device__ __forceinline__ void st_v4(void* p, uint4 v) { *reinterpret_cast<uint4*>(p) = v; }

// cp.async of 16 bytes global -> shared, bypassing L1; `src_bytes` 0 zero-fills the destination
// (used for tokens past the end of a range, so that masked rows hold zeros and never NaN).
// `smem`: a shared-memory address (a 32-bit `smem_addr`), or a generic pointer into shared memory.
__device__ __forceinline__ void cp_async_16(uint32_t smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  cp_async_16(static_cast<uint32_t>(__cvta_generic_to_shared(smem)), gmem, src_bytes);
}
// 16 bytes, or 16 zero bytes where `skip` (the source is not read then).
__device__ __forceinline__ void cp_async_16_unless(uint32_t smem, const void* gmem, bool skip) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %2, 0;\n"
      "cp.async.cg.shared.global [%0], [%1], 16, p;\n}\n" ::"r"(smem),
      "l"(gmem), "r"(static_cast<int>(skip)));
}
__device__ __forceinline__ void cp_async_16_unless(void* smem, const void* gmem, bool skip) {
  cp_async_16_unless(static_cast<uint32_t>(__cvta_generic_to_shared(smem)), gmem, skip);
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// ---- bulk async copies (Hopper's copy engine) -----------------------------------------------
// A bulk copy moves `bytes` (a multiple of 16, both addresses 16-byte aligned) from global to
// shared memory without tying up the issuing thread's load slots, and reports completion as
// transaction bytes on an mbarrier. The kernel waits for a phase of the barrier, which completes
// once every expected arrival has happened and every expected byte has landed.

__device__ __forceinline__ void mbarrier_init(uint32_t bar, int arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(arrivals));
}
// Thread block clusters (a launch with a cluster dimension; one CTA is a cluster of one).
// The CTAs of the calling thread's cluster.
__device__ __forceinline__ unsigned cluster_ctas() {
  unsigned n;
  asm volatile("mov.u32 %0, %%cluster_nctarank;\n" : "=r"(n));
  return n;
}
// A barrier of every thread of every CTA of the cluster: writes to shared memory before it (any
// CTA's) are visible to reads after it (release / acquire at cluster scope).
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::
                   : "memory");
}
// The generic address of `p` (this CTA's shared memory) in the shared memory of the cluster's CTA
// `rank`, where plain loads read it (distributed shared memory).
template <class T>
__device__ __forceinline__ const T* cluster_peer(const T* p, unsigned rank) {
  uint64_t q;
  asm volatile("mapa.u64 %0, %1, %2;\n" : "=l"(q) : "l"(reinterpret_cast<uint64_t>(p)), "r"(rank));
  return reinterpret_cast<const T*>(q);
}

// Makes initialized barriers visible to the copy engine (the async proxy).
__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// One arrival that also announces `bytes` more to come from bulk copies (0 allowed).
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.release.cta.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar),
               "r"(bytes)
               : "memory");
}
// One plain arrival (no transaction bytes).
__device__ __forceinline__ void mbarrier_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.release.cta.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// One arrival on `bar` made by the hardware once every cp.async this thread issued before has
// landed (.noinc: it is one of the arrivals the barrier was initialized to expect).
__device__ __forceinline__ void cp_async_mbarrier_arrive(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
// Blocks until the phase of the given parity has completed.
__device__ __forceinline__ void mbarrier_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\nwait_%=:\n"
      "mbarrier.try_wait.parity.acquire.cta.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
// An L2 policy that evicts these lines first (data read once: streamed K/V), so that what is
// read again (slot tables, Q, the weights of a step) stays in L2.
__device__ __forceinline__ uint64_t l2_evict_first_policy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}
// A bulk copy global -> shared completing on mbarrier `bar`, with an L2 cache policy.
__device__ __forceinline__ void bulk_copy_g2s(uint32_t dst, const void* src, uint32_t bytes,
                                              uint32_t bar, uint64_t policy) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], "
      "[%1], %2, [%3], %4;\n" ::"r"(dst),
      "l"(src), "r"(bytes), "r"(bar), "l"(policy)
      : "memory");
}
// Orders this thread's generic-proxy accesses of shared memory before later async-proxy ones
// (bulk copies, wgmma) that other threads start after a barrier.
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// setmaxnreg: a warpgroup (all of its threads) raises or lowers its registers per thread to N
// (a multiple of 8 in 24..256); a kernel using it is compiled at its launch bound's registers.
template <int N>
__device__ __forceinline__ void regs_increase() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void regs_decrease() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
// A launch configuration (cudaLaunchKernelEx) with one attribute: clusters of `cluster_x` CTAs
// along x (ClusterDims), or a programmatic dependent of the kernel before it in the stream
// (ProgrammaticDependent: see griddep_wait below). config.attrs points at attr: built in place,
// never copied.
struct OneAttributeLaunch {
  cudaLaunchAttribute attr{};
  cudaLaunchConfig_t config{};
  OneAttributeLaunch(const OneAttributeLaunch&) = delete;
  OneAttributeLaunch& operator=(const OneAttributeLaunch&) = delete;
  struct ClusterDims {
    int x;
  };
  struct ProgrammaticDependent {};
  OneAttributeLaunch(dim3 grid, int threads, size_t smem_bytes, cudaStream_t stream, ClusterDims c)
      : OneAttributeLaunch(grid, threads, smem_bytes, stream) {
    attr.id = cudaLaunchAttributeClusterDimension;
    attr.val.clusterDim.x = static_cast<unsigned>(c.x);
    attr.val.clusterDim.y = 1;
    attr.val.clusterDim.z = 1;
  }
  OneAttributeLaunch(dim3 grid, int threads, size_t smem_bytes, cudaStream_t stream,
                     ProgrammaticDependent)
      : OneAttributeLaunch(grid, threads, smem_bytes, stream) {
    attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr.val.programmaticStreamSerializationAllowed = 1;
  }

 private:
  OneAttributeLaunch(dim3 grid, int threads, size_t smem_bytes, cudaStream_t stream) {
    config.gridDim = grid;
    config.blockDim = dim3(threads);
    config.dynamicSmemBytes = smem_bytes;
    config.stream = stream;
    config.attrs = &attr;
    config.numAttrs = 1;
  }
};
// Programmatic dependent launch (a kernel launched with
// cudaLaunchAttributeProgrammaticStreamSerialization): griddep_launch_dependents lets the next such
// kernel in the stream start its CTAs as this grid's retire; griddep_wait blocks until every
// grid this one depends on has finished and its writes are visible (at once where there is none).
__device__ __forceinline__ void griddep_launch_dependents() {
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
}
__device__ __forceinline__ void griddep_wait() {
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
}
// bar.sync on a named barrier (0 is __syncthreads's): `threads` of the CTA, whole warps.
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
// atomicAdd with acquire-release semantics at GPU scope: one thread's arrival that publishes its
// CTA's writes (ordered before it by a barrier: release is cumulative) and, to the thread that
// sees the last count, every earlier arrival's writes (acquire; a barrier then extends that to
// its CTA). The pattern of CUDA's grid sync, without a full fence in every thread.
__device__ __forceinline__ uint32_t atomic_add_acq_rel_gpu(uint32_t* p, uint32_t v) {
  uint32_t old;
  asm volatile("atom.add.acq_rel.gpu.global.u32 %0, [%1], %2;\n"
               : "=r"(old)
               : "l"(p), "r"(v)
               : "memory");
  return old;
}
// The GPU's global nanosecond timer (diagnostics).
__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
// The SM this thread runs on (diagnostics).
__device__ __forceinline__ uint32_t sm_id() {
  uint32_t sm;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
  return sm;
}

// ---- packing floats to 16-bit pairs (lo in the low half, round to nearest even) ---------------

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
__device__ __forceinline__ uint32_t pack_f16x2(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// ---- widening to float ----------------------------------------------------------------------

__device__ __forceinline__ float2 bf16x2_to_float2(uint32_t v) {
  return make_float2(__uint_as_float(v << 16), __uint_as_float(v & 0xffff0000u));
}

// Two e4m3 codes (low byte first) -> two floats, through the hardware fp8x2 -> f16x2 convert
// (exact: every e4m3 value is an fp16 value).
__device__ __forceinline__ float2 e4m3x2_to_float2(uint16_t v) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(v), __NV_E4M3);
  return __half22float2(*reinterpret_cast<const __half2*>(&h));
}

// Two e5m2 codes (low byte first) -> two floats (exact: an e5m2 code is the high byte of an fp16).
__device__ __forceinline__ float2 e5m2x2_to_float2(uint16_t v) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(v), __NV_E5M2);
  return __half22float2(*reinterpret_cast<const __half2*>(&h));
}

// Four pairs -> 8 floats, in order.
__device__ __forceinline__ void pairs_to_floats(float2 a, float2 b, float2 c, float2 d,
                                                float (&f)[8]) {
  f[0] = a.x, f[1] = a.y, f[2] = b.x, f[3] = b.y;
  f[4] = c.x, f[5] = c.y, f[6] = d.x, f[7] = d.y;
}

// 8 bf16 (one 16-byte vector) -> 8 floats.
__device__ __forceinline__ void widen_bf16x8(const uint4 v, float (&f)[8]) {
  const float2 a = bf16x2_to_float2(v.x), b = bf16x2_to_float2(v.y);
  const float2 c = bf16x2_to_float2(v.z), d = bf16x2_to_float2(v.w);
  pairs_to_floats(a, b, c, d, f);
}

// ---- narrowing ------------------------------------------------------------------------------

// float -> e4m3, saturating, NaN -> 0x7f: the same bytes as fp8kv::float_to_e4m3.
__device__ __forceinline__ uint8_t float_to_e4m3_hw(float x) {
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3));
}
// Two floats -> two e4m3 codes (x in the low byte).
__device__ __forceinline__ uint16_t float2_to_e4m3x2_hw(float x, float y) {
  return static_cast<uint16_t>(
      __nv_cvt_float2_to_fp8x2(make_float2(x, y), __NV_SATFINITE, __NV_E4M3));
}
// Two floats -> two e5m2 codes (x in the low byte), saturating: fp8kv::float_to_e5m2's bytes.
__device__ __forceinline__ uint16_t float2_to_e5m2x2_hw(float x, float y) {
  return static_cast<uint16_t>(
      __nv_cvt_float2_to_fp8x2(make_float2(x, y), __NV_SATFINITE, __NV_E5M2));
}
// Two floats -> two codes of the cache's FP8 codec (kE4m3 or kE5m2).
template <KvCodec kCodec>
__device__ __forceinline__ uint16_t float2_to_fp8x2_hw(float x, float y) {
  static_assert(kCodec != KvCodec::kBf16, "an FP8 codec");
  if constexpr (kCodec == KvCodec::kE5m2) {
    return float2_to_e5m2x2_hw(x, y);
  } else {
    return float2_to_e4m3x2_hw(x, y);
  }
}
__device__ __forceinline__ uint16_t float_to_bf16_bits(float x) {
  const __nv_bfloat16 b = __float2bfloat16_rn(x);
  return *reinterpret_cast<const uint16_t*>(&b);
}

// x / s for a fixed s > 0 in three FMA-pipe operations instead of a division per element:
// r = RN(1/s) once, q = RN(x r), then one correction q' = RN(q + (x - q s) r), the remainder exact
// in an FMA. With r within half an ulp of 1/s, q' is the correctly rounded quotient (Markstein)
// while nothing over- or underflows: so the fast path only for s in [2^-60, 2^60], a true
// division otherwise. For |x| < 2^-100 the remainder (about 2^-46 x) may underflow and q' differ
// from the IEEE quotient in its last bits; the quotient is then below 2^-40, which every FP8 code
// rounds to zero (of x's sign, kept by copysign), so the quantizer's bytes are the CPU twin's
// (x / scale) exactly. Zero keeps its sign (the correction would turn -0 into +0); where x r
// overflows (x infinite, or a quotient at FLT_MAX's edge, which x r may round past) the division
// decides. tests/cuda/codec_test.cu checks all 2^32 floats x for many s.
struct ScaleDivider {
  float s, r;
  bool fast;
  __device__ explicit ScaleDivider(float scale)
      : s(scale), r(1.0f), fast(scale >= 0x1p-60f && scale <= 0x1p60f) {
    r = __frcp_rn(scale);
  }
  // q[i] = x[i] / s for a batch, as straight-line code: the fast path for every element, then the
  // division for the whole batch where any element needs it (s outside the range, or an x r that
  // overflowed: rare). A test and branch per element cut the batch's independent chains into a
  // basic block each, one element's latency after another's (quantize-on-write measured that,
  // docs/GPU.md ninth session).
  template <int N>
  __device__ __forceinline__ void divide(const float (&x)[N], float (&q)[N]) const {
    bool slow = !fast;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float a = __fmul_rn(x[i], r);
      const float rem = __fmaf_rn(-a, s, x[i]);
      slow |= fabsf(a) == INFINITY;  // x infinite, or x r past FLT_MAX
      q[i] = copysignf(__fmaf_rn(rem, r, a), x[i]);
    }
    if (slow) {
#pragma unroll
      for (int i = 0; i < N; ++i) q[i] = __fdiv_rn(x[i], s);
    }
  }
};

// ---- reductions -----------------------------------------------------------------------------

template <int kWidth = 32>
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWidth / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}
template <int kWidth = 32>
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = kWidth / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}
// Max of non-negative values held as float bits (|x| bit patterns order like their floats, and
// NaN patterns > inf > finite), so a NaN is never lost the way fmaxf would lose it.
template <int kWidth = 32>
__device__ __forceinline__ uint32_t warp_max_bits(uint32_t v) {
#pragma unroll
  for (int o = kWidth / 2; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}
// Running abs-max in memory (a non-negative float, possibly inf/NaN) raised to `bits`.
__device__ __forceinline__ void atomic_max_abs_bits(float* addr, uint32_t bits) {
  atomicMax(reinterpret_cast<unsigned int*>(addr), bits);
}

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// ---- tensor-core building blocks -----------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// The store form of ldmatrix_x4: lanes 8i..8i+7 give the row addresses of matrix i, whose row r
// takes r[i] of lanes 4r..4r+3 (4 bytes each, in lane order).
__device__ __forceinline__ void stmatrix_x4(uint32_t addr, const uint32_t (&r)[4]) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n"
               :
               : "r"(addr), "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3])
               : "memory");
}

// d += a * b, m16n8k16, bf16 inputs, fp32 accumulate.
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

}  // namespace fp8kv::cuda
