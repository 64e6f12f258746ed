// Runtime values -> compile-time constants for the CUDA kernels. Each macro's default case throws
// fp8kv::Error("Unsupported X"). Usage:
//   FP8KV_DISPATCH_HEAD_DIM(p.cache.head_dim, kHeadDim, { launch<kHeadDim>(...); });
#pragma once

#include <string>

#include "fp8kv/error.h"
#include "fp8kv/scheme.h"

#define FP8KV_DISPATCH_HEAD_DIM(head_dim, NAME, ...)                              \
  [&] {                                                                           \
    switch (head_dim) {                                                           \
      case 64: {                                                                  \
        constexpr int NAME = 64;                                                  \
        return __VA_ARGS__();                                                     \
      }                                                                           \
      case 128: {                                                                 \
        constexpr int NAME = 128;                                                 \
        return __VA_ARGS__();                                                     \
      }                                                                           \
      case 256: {                                                                 \
        constexpr int NAME = 256;                                                 \
        return __VA_ARGS__();                                                     \
      }                                                                           \
      default:                                                                    \
        throw ::fp8kv::Error("Unsupported head_dim " + std::to_string(head_dim) + \
                             " (CUDA kernels support 64, 128, 256)");             \
    }                                                                             \
  }()

#define FP8KV_DISPATCH_SCHEME(scheme, NAME, ...)                                                   \
  [&] {                                                                                            \
    switch (scheme) {                                                                              \
      case ::fp8kv::KvScheme::kBf16: {                                                             \
        constexpr ::fp8kv::KvScheme NAME = ::fp8kv::KvScheme::kBf16;                               \
        return __VA_ARGS__();                                                                      \
      }                                                                                            \
      case ::fp8kv::KvScheme::kFp8PerTensor: {                                                     \
        constexpr ::fp8kv::KvScheme NAME = ::fp8kv::KvScheme::kFp8PerTensor;                       \
        return __VA_ARGS__();                                                                      \
      }                                                                                            \
      case ::fp8kv::KvScheme::kFp8PerHead: {                                                       \
        constexpr ::fp8kv::KvScheme NAME = ::fp8kv::KvScheme::kFp8PerHead;                         \
        return __VA_ARGS__();                                                                      \
      }                                                                                            \
      case ::fp8kv::KvScheme::kFp8E5m2: {                                                          \
        constexpr ::fp8kv::KvScheme NAME = ::fp8kv::KvScheme::kFp8E5m2;                            \
        return __VA_ARGS__();                                                                      \
      }                                                                                            \
      case ::fp8kv::KvScheme::kFp8PerHeadBf16Q: {                                                  \
        constexpr ::fp8kv::KvScheme NAME = ::fp8kv::KvScheme::kFp8PerHeadBf16Q;                    \
        return __VA_ARGS__();                                                                      \
      }                                                                                            \
      default:                                                                                     \
        throw ::fp8kv::Error("Unsupported KV scheme " + std::to_string(static_cast<int>(scheme))); \
    }                                                                                              \
  }()

// Query heads handled by one decode CTA: the group size Hq/Hkv rounded up to 1, 2, 4 or 8; larger
// groups are split over several CTAs of 8 heads.
#define FP8KV_DISPATCH_GROUP_PAD(group_pad, NAME, ...)                                        \
  [&] {                                                                                       \
    switch (group_pad) {                                                                      \
      case 1: {                                                                               \
        constexpr int NAME = 1;                                                               \
        return __VA_ARGS__();                                                                 \
      }                                                                                       \
      case 2: {                                                                               \
        constexpr int NAME = 2;                                                               \
        return __VA_ARGS__();                                                                 \
      }                                                                                       \
      case 4: {                                                                               \
        constexpr int NAME = 4;                                                               \
        return __VA_ARGS__();                                                                 \
      }                                                                                       \
      case 8: {                                                                               \
        constexpr int NAME = 8;                                                               \
        return __VA_ARGS__();                                                                 \
      }                                                                                       \
      default:                                                                                \
        throw ::fp8kv::Error("Unsupported query heads per CTA " + std::to_string(group_pad)); \
    }                                                                                         \
  }()
