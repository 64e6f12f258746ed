// CudaBackend::upload_tensors: host slices into device memory through pinned staging buffers.
//
// Each worker thread owns a stream and two pinned buffers. It takes the next chunk (whole rows
// of one upload, kStagingBytes at most), waits until the copy that last used this buffer is done
// (its event), packs the rows into it (slice + conversion on the CPU, reading the file mapping),
// queues the copy -- and, for an F16 -> BF16 chunk, the conversion kernel on the copied bytes --
// and records the buffer's event. The CPU packs chunk k+1 while chunk k is on the bus, and the
// workers fault in the file's pages in parallel.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <vector>

#include "fp8kv/error.h"
#include "kernels/cuda/check.h"
#include "kernels/cuda/convert.h"
#include "kernels/host_upload.h"

namespace fp8kv::cuda {

namespace {

constexpr size_t kStagingBytes = 32u << 20;
constexpr int kBuffersPerWorker = 2;
constexpr int kMaxWorkers = 6;

// A worker's stream, pinned buffers and their events; everything freed on destruction (after
// the stream has drained).
struct Stage {
  cudaStream_t stream = nullptr;
  void* buf[kBuffersPerWorker] = {};
  cudaEvent_t done[kBuffersPerWorker] = {};
  Stage(size_t bytes) {
    check_cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "upload: stream");
    for (int b = 0; b < kBuffersPerWorker; ++b) {
      check_cuda(cudaHostAlloc(&buf[b], bytes, cudaHostAllocDefault), "upload: cudaHostAlloc");
      check_cuda(cudaEventCreateWithFlags(&done[b], cudaEventDisableTiming), "upload: event");
    }
  }
  ~Stage() {
    if (stream) cudaStreamSynchronize(stream);
    for (int b = 0; b < kBuffersPerWorker; ++b) {
      if (done[b]) cudaEventDestroy(done[b]);
      if (buf[b]) cudaFreeHost(buf[b]);
    }
    if (stream) cudaStreamDestroy(stream);
  }
  Stage(const Stage&) = delete;
  Stage& operator=(const Stage&) = delete;
};

}  // namespace

void upload_tensors(int device, const std::vector<HostUpload>& uploads) {
  validate_uploads(uploads);
  const size_t staging = std::max(kStagingBytes, largest_upload_row(uploads));
  const std::vector<UploadChunk> chunks = plan_upload_chunks(uploads, staging);
  if (chunks.empty()) return;
  const int workers =
      std::min(upload_threads(kMaxWorkers), static_cast<int>(std::min<size_t>(chunks.size(), 64)));
  std::atomic<size_t> next{0};
  run_workers(workers, [&](int) {
    // The current device is per thread.
    check_cuda(cudaSetDevice(device), "upload: cudaSetDevice");
    Stage stage(staging);
    int k = 0;
    for (size_t i = next++; i < chunks.size(); i = next++, k = (k + 1) % kBuffersPerWorker) {
      const UploadChunk& c = chunks[i];
      const HostUpload& u = uploads[c.upload];
      check_cuda(cudaEventSynchronize(stage.done[k]), "upload: wait for staging buffer");
      const bool f16_to_bf16 = u.src_dtype == DType::kF16 && u.dst_dtype == DType::kBF16;
      // F16 -> BF16 goes over as F16 (the same bytes per element) and is converted on the GPU.
      pack_rows(u, c.row0, c.row1, stage.buf[k], f16_to_bf16 ? DType::kF16 : u.dst_dtype);
      const int64_t n = (c.row1 - c.row0) * u.cols;
      const size_t bytes = static_cast<size_t>(n) * dtype_bytes(u.dst_dtype);
      void* dst = static_cast<uint8_t*>(u.dst) + c.dst_offset;
      check_cuda(cudaMemcpyAsync(dst, stage.buf[k], bytes, cudaMemcpyHostToDevice, stage.stream),
                 "upload: cudaMemcpyAsync");
      if (f16_to_bf16) launch_f16_to_bf16(static_cast<uint16_t*>(dst), n, stage.stream);
      check_cuda(cudaEventRecord(stage.done[k], stage.stream), "upload: cudaEventRecord");
    }
    check_cuda(cudaStreamSynchronize(stage.stream), "upload: synchronize");
  });
}

}  // namespace fp8kv::cuda
