// Hopper building blocks of the wgmma prefill kernel (prefill_ws.cuh): the matrix descriptors,
// the wgmma fences and waits, named barriers and register reallocation, and the wgmma wrappers
// for e4m3 x e4m3 -> f32, m64nNk32, and bf16 x bf16 -> f32, m64nNk16 (one asm per N; the
// accumulator operand lists come from the FP8KV_WGMMA_Dn macros), and the same for f16. e4m3:
// K-major A and B, no transpose (8-bit types support only K-major). bf16 / f16: the ss forms
// K-major, the rs forms with an MN-major B (imm-trans-b 1). The 16-bit rs forms accumulate
// (d += a * b); the ss forms and the e4m3 rs forms take scale-d as a predicate (d = a * b on the
// first k step).
#pragma once

#include <cstdint>

// Inline asm takes no arrays: FP8KV_WGMMA_Dn lists the accumulators d[0..n) as "+f" operands
// %0..%(n-1), the first operands of every wrapper below.
#define FP8KV_WGMMA_D4_AT(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
#define FP8KV_WGMMA_D16_AT(i)                                               \
  FP8KV_WGMMA_D4_AT(i), FP8KV_WGMMA_D4_AT(i + 4), FP8KV_WGMMA_D4_AT(i + 8), \
      FP8KV_WGMMA_D4_AT(i + 12)
#define FP8KV_WGMMA_D96 FP8KV_WGMMA_D64, FP8KV_WGMMA_D16_AT(64), FP8KV_WGMMA_D16_AT(80)
#define FP8KV_WGMMA_D24 FP8KV_WGMMA_D16_AT(0), FP8KV_WGMMA_D4_AT(16), FP8KV_WGMMA_D4_AT(20)
#define FP8KV_WGMMA_D32 FP8KV_WGMMA_D16_AT(0), FP8KV_WGMMA_D16_AT(16)
#define FP8KV_WGMMA_D64 FP8KV_WGMMA_D32, FP8KV_WGMMA_D16_AT(32), FP8KV_WGMMA_D16_AT(48)
#define FP8KV_WGMMA_D128                                                                   \
  FP8KV_WGMMA_D64, FP8KV_WGMMA_D16_AT(64), FP8KV_WGMMA_D16_AT(80), FP8KV_WGMMA_D16_AT(96), \
      FP8KV_WGMMA_D16_AT(112)

namespace fp8kv::cuda::prefill {

// d[32] = A (registers, the m16n8k32 A fragment per warp) * B (shared, desc_b) (+ d when
// `accumulate`), m64n64k32.
__device__ __forceinline__ void wgmma_rs_m64n64k32_e4m3(float (&d)[32], const uint32_t (&a)[4],
                                                        uint64_t desc_b, int accumulate) {
  asm volatile(
      "{\n.reg .pred acc;\nsetp.ne.b32 acc, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "
      "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, "
      "acc, 1, 1;\n}\n"
      : FP8KV_WGMMA_D32
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate));
}

// d[64] = A (registers, the m16n8k32 A fragment per warp) * B (shared, desc_b) (+ d when
// `accumulate`), m64n128k32.
__device__ __forceinline__ void wgmma_rs_m64n128k32_e4m3(float (&d)[64], const uint32_t (&a)[4],
                                                         uint64_t desc_b, int accumulate) {
  asm volatile(
      "{\n.reg .pred acc;\nsetp.ne.b32 acc, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "
      "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "
      "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "
      "%56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, acc, 1, 1;\n}\n"
      : FP8KV_WGMMA_D64
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate));
}

// d[128] = A (registers, the m16n8k32 A fragment per warp) * B (shared, desc_b) (+ d when
// `accumulate`), m64n256k32.
__device__ __forceinline__ void wgmma_rs_m64n256k32_e4m3(float (&d)[128], const uint32_t (&a)[4],
                                                         uint64_t desc_b, int accumulate) {
  asm volatile(
      "{\n.reg .pred acc;\nsetp.ne.b32 acc, %133, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k32.f32.e4m3.e4m3 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "
      "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "
      "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "
      "%56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, "
      "%74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, "
      "%92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, "
      "%108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, "
      "%123, %124, %125, %126, %127}, {%128, %129, %130, %131}, %132, acc, 1, 1;\n}\n"
      : FP8KV_WGMMA_D128
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate));
}

// d[32] = A * B (+ d when `accumulate`), m64n64k32: scale-d as a predicate, so the first
// k-step of a product needs no zeroed accumulators (no non-wgmma writes inside the pipeline).
__device__ __forceinline__ void wgmma_ss_m64n64k32_e4m3_scaled(float (&d)[32], uint64_t desc_a,
                                                               uint64_t desc_b, int accumulate) {
  asm volatile(
      "{\n.reg .pred acc;\nsetp.ne.b32 acc, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "
      "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, acc, 1, 1;\n}\n"
      : FP8KV_WGMMA_D32
      : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

// d[64] = A * B (+ d when `accumulate`), m64n128k32: scale-d as a predicate, so the first
// k-step of a product needs no zeroed accumulators (no non-wgmma writes inside the pipeline).
__device__ __forceinline__ void wgmma_ss_m64n128k32_e4m3_scaled(float (&d)[64], uint64_t desc_a,
                                                                uint64_t desc_b, int accumulate) {
  asm volatile(
      "{\n.reg .pred acc;\nsetp.ne.b32 acc, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "
      "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "
      "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "
      "%56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, acc, 1, 1;\n}\n"
      : FP8KV_WGMMA_D64
      : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

// ---- 16-bit x 16-bit -> f32, m64nNk16 (the bf16-Q schemes, prefill_ws.cuh) ----
// Each wrapper in two operand types, T = bf16 (the bf16 cache) or f16 (the widened fp8 caches):
// FP8KV_WGMMA_16BIT(T) defines the set with T in the names and the instruction.
#define FP8KV_WGMMA_16BIT(T)                                                                      \
  /* d[96] = A * B (+ d when `accumulate`), m64n192k16, both K-major. */                          \
  __device__ __forceinline__ void wgmma_ss_m64n192k16_##T##_scaled(                               \
      float(&d)[96], uint64_t desc_a, uint64_t desc_b, int accumulate) {                          \
    asm volatile(                                                                                 \
        "{\n.reg .pred acc;\nsetp.ne.b32 acc, %98, 0;\n"                                          \
        "wgmma.mma_async.sync.aligned.m64n192k16.f32." #T "." #T                                  \
        " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, " \
        "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, "   \
        "%36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, "   \
        "%53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, "   \
        "%70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, "   \
        "%87, %88, %89, %90, %91, %92, %93, %94, %95}, %96, %97, acc, 1, 1, 0, 0;\n}\n"           \
        : FP8KV_WGMMA_D96                                                                         \
        : "l"(desc_a), "l"(desc_b), "r"(accumulate));                                             \
  }                                                                                               \
  /* d[24] = A * B (+ d when `accumulate`), m64n48k16, both K-major. */                           \
  __device__ __forceinline__ void wgmma_ss_m64n48k16_##T##_scaled(                                \
      float(&d)[24], uint64_t desc_a, uint64_t desc_b, int accumulate) {                          \
    asm volatile(                                                                                 \
        "{\n.reg .pred acc;\nsetp.ne.b32 acc, %26, 0;\n"                                          \
        "wgmma.mma_async.sync.aligned.m64n48k16.f32." #T "." #T                                   \
        " "                                                                                       \
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "  \
        "%19, %20, %21, %22, %23}, %24, %25, acc, 1, 1, 0, 0;\n}\n"                               \
        : FP8KV_WGMMA_D24                                                                         \
        : "l"(desc_a), "l"(desc_b), "r"(accumulate));                                             \
  }                                                                                               \
  /* d[32] = A * B (+ d when `accumulate`), m64n64k16, both K-major. */                           \
  __device__ __forceinline__ void wgmma_ss_m64n64k16_##T##_scaled(                                \
      float(&d)[32], uint64_t desc_a, uint64_t desc_b, int accumulate) {                          \
    asm volatile(                                                                                 \
        "{\n.reg .pred acc;\nsetp.ne.b32 acc, %34, 0;\n"                                          \
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." #T "." #T                                   \
        " "                                                                                       \
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "  \
        "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, acc, 1, 1, " \
        "0, 0;\n}\n"                                                                              \
        : FP8KV_WGMMA_D32                                                                         \
        : "l"(desc_a), "l"(desc_b), "r"(accumulate));                                             \
  }                                                                                               \
  /* d[64] = A * B (+ d when `accumulate`), m64n128k16, both K-major. */                          \
  __device__ __forceinline__ void wgmma_ss_m64n128k16_##T##_scaled(                               \
      float(&d)[64], uint64_t desc_a, uint64_t desc_b, int accumulate) {                          \
    asm volatile(                                                                                 \
        "{\n.reg .pred acc;\nsetp.ne.b32 acc, %66, 0;\n"                                          \
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." #T "." #T                                  \
        " "                                                                                       \
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "  \
        "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, "   \
        "%36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, "   \
        "%53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, acc, 1, 1, 0, 0;\n}\n" \
        : FP8KV_WGMMA_D64                                                                         \
        : "l"(desc_a), "l"(desc_b), "r"(accumulate));                                             \
  }                                                                                               \
  /* d[32] += A (registers: the m16n8k16 A fragment per warp) * B (shared, desc_b, MN-major:      \
     imm-trans-b 1), m64n64k16. */                                                                \
  __device__ __forceinline__ void wgmma_rs_m64n64k16_##T##_tnsp_b(                                \
      float(&d)[32], const uint32_t(&a)[4], uint64_t desc_b) {                                    \
    asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32." #T "." #T                          \
                 " "                                                                              \
                 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, "   \
                 "%17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "   \
                 "{%32, %33, %34, %35}, %36, 1, 1, 1, 1;\n"                                       \
                 : FP8KV_WGMMA_D32                                                                \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b));                      \
  }                                                                                               \
  /* d[64] += A (registers) * B (shared, MN-major), m64n128k16. */                                \
  __device__ __forceinline__ void wgmma_rs_m64n128k16_##T##_tnsp_b(                               \
      float(&d)[64], const uint32_t(&a)[4], uint64_t desc_b) {                                    \
    asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32." #T "." #T                         \
                 " "                                                                              \
                 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, "   \
                 "%17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "    \
                 "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, "    \
                 "%47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, "    \
                 "%62, %63}, {%64, %65, %66, %67}, %68, 1, 1, 1, 1;\n"                            \
                 : FP8KV_WGMMA_D64                                                                \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b));                      \
  }                                                                                               \
  /* d[128] += A (registers) * B (shared, MN-major), m64n256k16. */                               \
  __device__ __forceinline__ void wgmma_rs_m64n256k16_##T##_tnsp_b(                               \
      float(&d)[128], const uint32_t(&a)[4], uint64_t desc_b) {                                   \
    asm volatile(                                                                                 \
        "wgmma.mma_async.sync.aligned.m64n256k16.f32." #T "." #T                                  \
        " "                                                                                       \
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "  \
        "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, "   \
        "%36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, "   \
        "%53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, "   \
        "%70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, "   \
        "%87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, "     \
        "%103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, "    \
        "%117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, {%128, %129, %130, "  \
        "%131}, %132, 1, 1, 1, 1;\n"                                                              \
        : FP8KV_WGMMA_D128                                                                        \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b));                               \
  }                                                                                               \
  /* The forms above by N: S = Q K^T's k-steps, and O += P V. */                                  \
  template <int N>                                                                                \
  __device__ __forceinline__ void wgmma_ss_first_##T(float(&d)[N / 2], uint64_t desc_a,           \
                                                     uint64_t desc_b, int accumulate) {           \
    if constexpr (N == 192) {                                                                     \
      wgmma_ss_m64n192k16_##T##_scaled(d, desc_a, desc_b, accumulate);                            \
    } else if constexpr (N == 48) {                                                               \
      wgmma_ss_m64n48k16_##T##_scaled(d, desc_a, desc_b, accumulate);                             \
    } else if constexpr (N == 64) {                                                               \
      wgmma_ss_m64n64k16_##T##_scaled(d, desc_a, desc_b, accumulate);                             \
    } else {                                                                                      \
      wgmma_ss_m64n128k16_##T##_scaled(d, desc_a, desc_b, accumulate);                            \
    }                                                                                             \
  }                                                                                               \
  template <int N>                                                                                \
  __device__ __forceinline__ void wgmma_rs_##T(float(&d)[N / 2], const uint32_t(&a)[4],           \
                                               uint64_t desc_b) {                                 \
    if constexpr (N == 64) {                                                                      \
      wgmma_rs_m64n64k16_##T##_tnsp_b(d, a, desc_b);                                              \
    } else if constexpr (N == 128) {                                                              \
      wgmma_rs_m64n128k16_##T##_tnsp_b(d, a, desc_b);                                             \
    } else {                                                                                      \
      wgmma_rs_m64n256k16_##T##_tnsp_b(d, a, desc_b);                                             \
    }                                                                                             \
  }
FP8KV_WGMMA_16BIT(bf16)
FP8KV_WGMMA_16BIT(f16)
#undef FP8KV_WGMMA_16BIT

// ---- descriptors, fences, barriers ----

constexpr int kCoreBytes = 128;  // one 8 x 16-byte core matrix

// Shared-memory matrix descriptor, no swizzle (PTX ISA "Matrix Descriptor Format").
__host__ __device__ __forceinline__ uint64_t wgmma_desc(uint32_t smem_address,
                                                        uint32_t leading_bytes,
                                                        uint32_t stride_bytes) {
  return static_cast<uint64_t>((smem_address & 0x3ffff) >> 4) |
         (static_cast<uint64_t>((leading_bytes & 0x3ffff) >> 4) << 16) |
         (static_cast<uint64_t>((stride_bytes & 0x3ffff) >> 4) << 32);
}
// The descriptor of an operand `bytes` further on (a multiple of 16) in shared memory: its start
// address field (bits 0-13, the address / 16) plus bytes / 16, added in the low word alone
// (every address of the SM's 228 KB stays below 2^18: no carry out of the field; tests/cuda/
// wgmma_desc_test.cu checks it against building the descriptor from the address).
__host__ __device__ __forceinline__ uint64_t wgmma_desc_plus(uint64_t desc, uint32_t bytes) {
  return (desc & 0xffffffff00000000ull) | (static_cast<uint32_t>(desc) + (bytes >> 4));
}
__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
// Pins accumulator registers at this point of the program: the compiler does not know that
// wgmma writes them asynchronously.
template <int N>
__device__ __forceinline__ void fence_operands(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
// `a` when kFirst, else `b` (a compile-time choice between two register arrays, no pointer).
template <bool kFirst, class A, class B>
__device__ __forceinline__ constexpr auto& pick(A& a, B& b) {
  if constexpr (kFirst)
    return a;
  else
    return b;
}

template <int N>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b,
                                         int accumulate) {
  if constexpr (N == 64)
    wgmma_rs_m64n64k32_e4m3(d, a, desc_b, accumulate);
  else if constexpr (N == 128)
    wgmma_rs_m64n128k32_e4m3(d, a, desc_b, accumulate);
  else
    wgmma_rs_m64n256k32_e4m3(d, a, desc_b, accumulate);
}

// Descriptor of a K-major operand in the 128-byte swizzle layout (PTX "Matrix Descriptor
// Format": swizzle mode 1 in bits 62-63): rows of 128 bytes, 8-row atoms 1024 bytes apart (the
// stride byte offset), the leading byte offset unused; a k step inside the row advances the start
// address (the hardware applies the swizzle to the address bits, atoms 1024-byte aligned).
__host__ __device__ __forceinline__ uint64_t wgmma_desc_sw128(uint32_t smem_address) {
  return static_cast<uint64_t>((smem_address & 0x3ffff) >> 4) | (1ull << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (1ull << 62);
}
// Descriptor of an MN-major operand in the 128-byte swizzle layout (the bf16 V tile [keys][D]):
// atoms of 8 k rows (keys) x 128 bytes of MN (64 d), each row swizzled as in the K-major form;
// atoms adjacent in K are 1024 bytes apart (stride byte offset), those adjacent in MN
// `leading_bytes` apart (leading byte offset: a whole [keys][64 d] block, for D > 64).
__host__ __device__ __forceinline__ uint64_t wgmma_desc_sw128_mn(uint32_t smem_address,
                                                                 uint32_t leading_bytes) {
  return static_cast<uint64_t>((smem_address & 0x3ffff) >> 4) |
         (static_cast<uint64_t>((leading_bytes & 0x3ffff) >> 4) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (1ull << 62);
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// S = Q K^T's k-steps: the first overwrites the accumulators (scale-d 0), so they need no zeroing.
template <int N>
__device__ __forceinline__ void wgmma_ss_first(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b,
                                               int accumulate) {
  if constexpr (N == 64)
    wgmma_ss_m64n64k32_e4m3_scaled(d, desc_a, desc_b, accumulate);
  else
    wgmma_ss_m64n128k32_e4m3_scaled(d, desc_a, desc_b, accumulate);
}

// The 16-bit forms of the two above (kF16: f16 operands, else bf16): S = Q K^T's k-steps
// (K-major A and B), and O += P V with P in registers and V MN-major ([keys][D], D contiguous:
// imm-trans-b 1, no transposition in memory).
template <bool kF16, int N>
__device__ __forceinline__ void wgmma_ss_first_16bit(float (&d)[N / 2], uint64_t desc_a,
                                                     uint64_t desc_b, int accumulate) {
  if constexpr (kF16) {
    wgmma_ss_first_f16<N>(d, desc_a, desc_b, accumulate);
  } else {
    wgmma_ss_first_bf16<N>(d, desc_a, desc_b, accumulate);
  }
}
template <bool kF16, int N>
__device__ __forceinline__ void wgmma_rs_16bit(float (&d)[N / 2], const uint32_t (&a)[4],
                                               uint64_t desc_b) {
  if constexpr (kF16) {
    wgmma_rs_f16<N>(d, a, desc_b);
  } else {
    wgmma_rs_bf16<N>(d, a, desc_b);
  }
}

}  // namespace fp8kv::cuda::prefill
