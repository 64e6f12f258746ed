// The host side of Backend::upload_tensors, shared by both backends: validation, the cut of the
// uploads into row chunks, the packing (slice + conversion) of a chunk, and worker threads.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

#include "fp8kv/backend.h"

namespace fp8kv {

// Throws Error "upload_tensors: upload i: ..." naming the bad field and its value (null pointers,
// negative or out-of-range rows/columns, an F16 destination). Nothing is copied before it runs.
void validate_uploads(const std::vector<HostUpload>& uploads);

// Rows [row0, row1) of upload `upload`: at dst_offset bytes into its destination.
struct UploadChunk {
  size_t upload = 0;
  int64_t row0 = 0;
  int64_t row1 = 0;
  size_t dst_offset = 0;
};
// Cuts every upload into chunks of whole rows of at most max_bytes destination bytes (one row
// per chunk when a row alone is larger), in upload order. Empty uploads give no chunk.
std::vector<UploadChunk> plan_upload_chunks(const std::vector<HostUpload>& uploads,
                                            size_t max_bytes);
// The largest destination row of any upload, in bytes.
size_t largest_upload_row(const std::vector<HostUpload>& uploads);

// Rows [row0, row1) of u's slice, converted to out_dtype, densely into out ([row1 - row0, cols]).
// out_dtype is u.dst_dtype, or u.src_dtype (a plain copy of the slice: the CUDA backend converts
// F16 -> BF16 after the copy, on the GPU). The F16 -> BF16 conversion here is the CPU twin of
// that kernel (f16_to_bf16).
void pack_rows(const HostUpload& u, int64_t row0, int64_t row1, void* out, DType out_dtype);

// Runs fn(worker) on `threads` threads (the calling thread is one of them) and rethrows the
// first exception any of them threw, after all have finished.
void run_workers(int threads, const std::function<void(int worker)>& fn);
// Worker threads for host copies: the hardware's threads, at most `cap`.
int upload_threads(int cap);

}  // namespace fp8kv
