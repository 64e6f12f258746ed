// Element-type conversion on the GPU for the weight loader (convert.cu), and the staged upload
// pipeline of CudaBackend::upload_tensors (upload.cpp).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "fp8kv/backend.h"

namespace fp8kv::cuda {

// In place: x[i] = f16_to_bf16(x[i]) for i < n; x [n] device memory, IEEE half bits in,
// bf16 bits out. The CPU twin: pack_rows's F16 -> BF16 conversion (kernels/host_upload.h), the
// same f16_to_bf16 of fp8.h.
void launch_f16_to_bf16(uint16_t* x, int64_t n, cudaStream_t stream);

// Backend::upload_tensors on `device`: worker threads pack chunks of the uploads from host
// memory into pinned staging buffers (two per worker, so that a worker packs one while the other
// is copied) and copy them on their own streams; F16 -> BF16 chunks are copied as F16 and
// converted on the GPU. Returns when every copy and conversion has finished.
void upload_tensors(int device, const std::vector<HostUpload>& uploads);

}  // namespace fp8kv::cuda
