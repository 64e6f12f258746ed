// Element types of weight tensors, on disk (safetensors) and in host or backend memory.
#pragma once

namespace fp8kv {

enum class DType { kBF16, kF16, kF32 };
// "BF16", "F16", "F32" (the safetensors spelling).
inline const char* dtype_name(DType t) {
  return t == DType::kBF16 ? "BF16" : t == DType::kF16 ? "F16" : "F32";
}
inline int dtype_bytes(DType t) { return t == DType::kF32 ? 4 : 2; }

}  // namespace fp8kv
