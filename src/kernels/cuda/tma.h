// Tensor maps for the copy engine's tensor copies (TMA, cp.async.bulk.tensor). The driver
// encodes them; the runtime hands out its entry point, so nothing links libcuda.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include <cstdint>

namespace fp8kv::cuda {

// The tensor map of a 3D tensor of 32-bit elements at `base`: dims[0] elements contiguous, dims[1]
// and dims[2] strides[0] and strides[1] bytes apart, read in boxes of box[0] x box[1] x box[2]
// elements that land in shared memory densely (dim 0 fastest) in the 128-byte swizzle (box[0] *
// 4 == 128: a box row is one swizzle line); elements of a box past the tensor land as zeros.
// False, with `map` unusable, where the driver lacks the entry point or the tensor breaks the
// copy engine's rules (base and strides multiples of 16 bytes, strides below 2^40, dimensions
// up to 2^32, boxes of 1..256 elements a dimension).
inline bool encode_tma_3d_u32_sw128(CUtensorMap* map, const void* base, const uint64_t (&dims)[3],
                                    const uint64_t (&strides)[2], const uint32_t (&box)[3]) {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault,
                                         &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();  // not sticky; the caller reports it
      fn = nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  if (encode == nullptr || reinterpret_cast<uintptr_t>(base) % 16 != 0 || box[0] * 4 != 128) {
    return false;
  }
  for (int i = 0; i < 3; ++i) {
    if (dims[i] == 0 || dims[i] > (1ull << 32) || box[i] == 0 || box[i] > 256) return false;
  }
  for (uint64_t s : strides) {
    if (s % 16 != 0 || s >= (1ull << 40)) return false;
  }
  const cuuint64_t g_dims[3] = {dims[0], dims[1], dims[2]};
  const cuuint64_t g_strides[2] = {strides[0], strides[1]};
  const cuuint32_t g_box[3] = {box[0], box[1], box[2]};
  const cuuint32_t element_strides[3] = {1, 1, 1};
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT32, 3, const_cast<void*>(base), g_dims, g_strides,
                g_box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_NONE, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

}  // namespace fp8kv::cuda
