// The CUDA backend: device memory on one GPU, work queued on one stream, every kernel validated
// on the host (kernels/validate.h) before anything is launched.
//
// Quantize-on-write cannot see the slots (device memory) on the host. It runs a check kernel that
// records the first token whose slot is out of range in a device word; the write kernel reads
// that word and writes nothing when it is set; the backend reads it back (one stream sync) and
// throws Error naming the token and its slot. Attention batches are checked on the host only when
// FP8KV_CUDA_CHECK_BATCH=1 (a debug mode: it copies the batch arrays back).
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "fp8kv/backend.h"
#include "fp8kv/error.h"
#include "kernels/cuda/check.h"
#include "kernels/cuda/convert.h"
#include "kernels/cuda/launchers.h"
#include "kernels/cuda/quantize.h"
#include "kernels/validate.h"

namespace fp8kv {
namespace {

using cuda::check_cuda;

template <typename T>
std::vector<T> to_host(const T* device, size_t n, cudaStream_t stream) {
  std::vector<T> host(n);
  if (n) check_cuda(cudaMemcpyAsync(host.data(), device, n * sizeof(T), cudaMemcpyDeviceToHost, stream), "cuda backend: copy to host");
  check_cuda(cudaStreamSynchronize(stream), "cuda backend: synchronize");
  return host;
}

class CudaBackend final : public Backend {
 public:
  CudaBackend(int device, cudaStream_t stream) : device_(device), stream_(stream) {
    int count = 0;
    check_cuda(cudaGetDeviceCount(&count), "cuda backend: cudaGetDeviceCount");
    if (device < 0 || device >= count) {
      throw Error("cuda backend: device " + std::to_string(device) + " not in [0, " +
                  std::to_string(count) + ")");
    }
    check_cuda(cudaSetDevice(device_), "cuda backend: cudaSetDevice");
    cudaDeviceProp prop{};
    check_cuda(cudaGetDeviceProperties(&prop, device_), "cuda backend: cudaGetDeviceProperties");
    if (prop.major != 9) {
      throw Error("cuda backend: device " + std::to_string(device) + " (" + prop.name +
                  ") has compute capability " + std::to_string(prop.major) + "." +
                  std::to_string(prop.minor) + "; fp8kv's kernels are built for sm_90a (Hopper)");
    }
    name_ = std::string("cuda:") + std::to_string(device) + " (" + prop.name + ")";
    check_cuda(cudaMalloc(&bad_token_, sizeof *bad_token_), "cuda backend: cudaMalloc");
    check_cuda(cudaMalloc(&slot_error_, sizeof *slot_error_), "cuda backend: cudaMalloc");
    check_cuda(cudaMemset(slot_error_, 0xff, sizeof *slot_error_), "cuda backend: cudaMemset");
    const char* env = std::getenv("FP8KV_CUDA_CHECK_BATCH");
    check_batch_ = env != nullptr && std::string(env) == "1";
  }
  ~CudaBackend() override {
    cudaSetDevice(device_);
    cudaStreamSynchronize(stream_);
    cudaFree(bad_token_);
    cudaFree(slot_error_);
    cudaFree(workspace_);
  }

  std::string name() const override { return name_; }
  bool cuda_memory() const override { return true; }
  void* cuda_stream() const override { return stream_; }

  void* alloc(size_t bytes) override {
    select();
    void* p = nullptr;
    const cudaError_t e = cudaMalloc(&p, bytes == 0 ? 1 : bytes);
    if (e != cudaSuccess) {
      throw Error("cuda backend: cudaMalloc of " + std::to_string(bytes) + " bytes: " + cudaGetErrorString(e));
    }
    return p;
  }
  void free(void* ptr) override {
    select();
    check_cuda(cudaFree(ptr), "cuda backend: cudaFree");
  }
  void upload(void* dst, const void* host_src, size_t bytes) override {
    select();
    // From pageable memory the call returns once the source is staged: the caller may reuse it.
    if (bytes) check_cuda(cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyHostToDevice, stream_), "cuda backend: upload");
  }
  void download(void* host_dst, const void* src, size_t bytes) override {
    select();
    if (bytes) check_cuda(cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDeviceToHost, stream_), "cuda backend: download");
    check_cuda(cudaStreamSynchronize(stream_), "cuda backend: download (synchronize)");
    throw_slot_error();
  }
  void memset(void* dst, int value, size_t bytes) override {
    select();
    if (bytes) check_cuda(cudaMemsetAsync(dst, value, bytes, stream_), "cuda backend: memset");
  }
  void synchronize() override {
    select();
    check_cuda(cudaStreamSynchronize(stream_), "cuda backend: synchronize");
    throw_slot_error();
  }
  void upload_tensors(const std::vector<HostUpload>& uploads) override {
    select();
    // The copies run on the uploader's own streams: work queued here before must not see them
    // half done (nor they it).
    check_cuda(cudaStreamSynchronize(stream_), "cuda backend: upload_tensors (synchronize)");
    cuda::upload_tensors(device_, uploads);
  }

  void quantize_kv(const QuantizeKvParams& p) override {
    validate_quantize_kv(p);
    if (p.num_tokens == 0) return;
    select();
    cuda::launch_check_slots(p, bad_token_, stream_);
    // No host synchronization here (a decode step stays sync-free): a refused write is recorded
    // on the device and thrown by the next synchronize() or download(); at once in the debug
    // mode FP8KV_CUDA_CHECK_BATCH=1.
    cuda::launch_quantize_kv(p, bad_token_, slot_error_, stream_);
    if (check_batch_) synchronize();
  }

  void quantize_q(const QuantizeQParams& p) override {
    validate_quantize_q(p);
    select();
    if (check_batch_) {
      const auto cu = to_host(p.cu_seqlens_q, static_cast<size_t>(p.num_requests) + 1, stream_);
      check_cu_seqlens("quantize_q", cu.data(), p.num_requests, p.total_q);
    }
    cuda::launch_quantize_q(p, stream_);
  }

  void prefill_attention(const AttentionParams& p) override {
    validate_attention(p, AttentionPhase::kPrefill);
    select();
    if (check_batch_) check_batch_on_host(p, AttentionPhase::kPrefill);
    cuda::launch_prefill_attention(p, stream_);
  }

  void decode_attention(const AttentionParams& p) override {
    validate_attention(p, AttentionPhase::kDecode);
    select();
    if (check_batch_) check_batch_on_host(p, AttentionPhase::kDecode);
    const size_t need = cuda::decode_workspace_bytes(p);
    if (need > workspace_bytes_) {
      // The previous workspace may still be read by queued work: free it after that work.
      check_cuda(cudaStreamSynchronize(stream_), "cuda backend: decode workspace");
      check_cuda(cudaFree(workspace_), "cuda backend: cudaFree");
      workspace_ = nullptr;
      workspace_bytes_ = 0;
      check_cuda(cudaMalloc(&workspace_, need), "cuda backend: cudaMalloc (decode workspace)");
      workspace_bytes_ = need;
    }
    cuda::launch_decode_attention(p, workspace_, stream_);
  }

 private:
  void select() { check_cuda(cudaSetDevice(device_), "cuda backend: cudaSetDevice"); }

  void check_batch_on_host(const AttentionParams& p, AttentionPhase phase) {
    const AttentionBatch& b = p.batch;
    const size_t B = static_cast<size_t>(b.num_requests);
    const auto seq_len = to_host(b.seq_len, B, stream_);
    const auto cu = to_host(b.cu_seqlens_q, B + 1, stream_);
    const auto req_index = to_host(b.req_index, B, stream_);
    int max_row = 0;
    for (int32_t r : req_index) max_row = std::max(max_row, r);
    const auto table = to_host(b.req_to_token, static_cast<size_t>(max_row + 1) * b.max_len, stream_);
    AttentionBatch host = b;
    host.seq_len = seq_len.data();
    host.cu_seqlens_q = cu.data();
    host.req_index = req_index.data();
    host.req_to_token = table.data();
    check_batch(host, p.cache.num_slots, phase);
  }

  int device_;
  cudaStream_t stream_;
  std::string name_;
  unsigned long long* bad_token_ = nullptr;  // [1] first token with a bad slot (quantize_kv)
  cuda::SlotError* slot_error_ = nullptr;    // the first refused quantize_kv not yet reported

  // After a stream synchronization: throws (once) the refusal a quantize_kv recorded.
  void throw_slot_error() {
    cuda::SlotError e{};
    check_cuda(cudaMemcpy(&e, slot_error_, sizeof e, cudaMemcpyDeviceToHost), "cuda backend: slot check");
    if (e.token == ULLONG_MAX) return;
    check_cuda(cudaMemset(slot_error_, 0xff, sizeof e), "cuda backend: slot check reset");
    throw Error("quantize_kv: token " + std::to_string(e.token) + ": slot " +
                std::to_string(static_cast<long long>(e.slot)) + " out of [0, num_slots " +
                std::to_string(e.num_slots) + ") (nothing written)");
  }
  void* workspace_ = nullptr;                // split-KV partials of decode
  size_t workspace_bytes_ = 0;
  bool check_batch_ = false;
};

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(int device, void* stream) {
  return std::make_unique<CudaBackend>(device, static_cast<cudaStream_t>(stream));
}

bool cuda_available() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    cudaGetLastError();  // clear the sticky "no device" error
    return false;
  }
  for (int d = 0; d < count; ++d) {
    int major = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, d) == cudaSuccess && major == 9) return true;
  }
  return false;
}

}  // namespace fp8kv
