// Shape rules of ModelOps::linear_ordered, shared by the CPU twin and the CUDA kernel.
#pragma once

#include <cstdint>
#include <string>

#include "fp8kv/error.h"

namespace fp8kv {

// At most 2^kMaxOrderedLevels runs: the kernel keeps one partial sum per tree level.
constexpr int kMaxOrderedLevels = 3;
constexpr int kMaxOrderedChunks = 1 << kMaxOrderedLevels;

inline void check_ordered_shape(int64_t m, int64_t n, int64_t k, int chunks) {
  if (m < 0 || n <= 0 || k <= 0) {
    throw Error("linear_ordered: bad shape m " + std::to_string(m) + ", n " + std::to_string(n) +
                ", k " + std::to_string(k));
  }
  if (chunks < 1 || chunks > kMaxOrderedChunks || (chunks & (chunks - 1)) != 0 || k % chunks != 0) {
    throw Error("linear_ordered: chunks " + std::to_string(chunks) +
                " must be a power of two up to " + std::to_string(kMaxOrderedChunks) +
                " that divides k " + std::to_string(k));
  }
  if (m > INT32_MAX || n > INT32_MAX || k > INT32_MAX) {
    throw Error("linear_ordered: a dimension exceeds INT32_MAX");
  }
}

}  // namespace fp8kv
