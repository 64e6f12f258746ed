// The CUDA backend: device memory on one GPU, work queued on one stream, every kernel validated
// on the host (kernels/validate.h) before anything is launched.
//
// The index arrays live in device memory, which the host cannot read without a sync per call.
// Quantize-on-write runs a check kernel that records the first token whose slot is out of range
// in a device word; the write kernel reads that word and writes nothing when it is set. Attention
// kernels skip a request whose b_req_idx is outside req_to_token's rows. Both record the refusal
// in one device error block (device_error.h), which synchronize() and download() read after
// their stream sync and throw as Error naming the kernel, the index and the value. The rest of an
// attention batch (seq_len against max_len, the slots in req_to_token) is checked on the host only
// when FP8KV_CUDA_CHECK_BATCH=1 (a debug mode: it copies the batch arrays back).
//
// Recording (begin_capture / end_capture): stream capture of the backend's stream in the
// thread-local mode, so that a call that would synchronize or allocate during it (the decode
// workspace grown, the debug mode's copies back) fails instead of being recorded; the caller
// then runs the work eagerly. The graph replays the same launches, the device error block and
// the slot check word included: a refusal made by a replayed kernel surfaces at the next
// synchronize() as it does eagerly.
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

// An instantiated CUDA graph of the backend's stream.
class CudaStepGraph final : public StepGraph {
 public:
  CudaStepGraph(int device, cudaStream_t stream, cudaGraphExec_t exec)
      : device_(device), stream_(stream), exec_(exec) {}
  ~CudaStepGraph() override {
    cudaSetDevice(device_);
    cudaStreamSynchronize(stream_);  // no launch of it may be left in flight
    cudaGraphExecDestroy(exec_);
  }
  void launch() override {
    check_cuda(cudaSetDevice(device_), "cuda backend: cudaSetDevice");
    check_cuda(cudaGraphLaunch(exec_, stream_), "cuda backend: cudaGraphLaunch");
  }

 private:
  int device_;
  cudaStream_t stream_;
  cudaGraphExec_t exec_;
};

template <typename T>
std::vector<T> to_host(const T* device, size_t n, cudaStream_t stream) {
  std::vector<T> host(n);
  if (n)
    check_cuda(cudaMemcpyAsync(host.data(), device, n * sizeof(T), cudaMemcpyDeviceToHost, stream),
               "cuda backend: copy to host");
  check_cuda(cudaStreamSynchronize(stream), "cuda backend: synchronize");
  return host;
}

class CudaBackend final : public Backend {
 public:
  // own_stream: a stream of the backend's own instead of `stream` (created here, destroyed
  // with the backend).
  CudaBackend(int device, cudaStream_t stream, bool own_stream = false)
      : device_(device), stream_(stream) {
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
    check_cuda(cudaMalloc(&device_error_, sizeof *device_error_), "cuda backend: cudaMalloc");
    const char* env = std::getenv("FP8KV_CUDA_CHECK_BATCH");
    check_batch_ = env != nullptr && std::string(env) == "1";
    if (own_stream) {
      check_cuda(cudaStreamCreate(&stream_), "cuda backend: cudaStreamCreate");
      own_stream_ = true;
    }
    // On the backend's stream (a caller's may be non-blocking: the legacy default stream, where a
    // plain cudaMemset goes, does not order with it), done before the first kernel can record.
    check_cuda(cudaMemsetAsync(device_error_, 0xff, sizeof *device_error_, stream_),
               "cuda backend: memset");
    check_cuda(cudaStreamSynchronize(stream_), "cuda backend: synchronize");
  }
  ~CudaBackend() override {
    cudaSetDevice(device_);
    cudaStreamSynchronize(stream_);
    cudaFree(bad_token_);
    cudaFree(device_error_);
    cudaFree(workspace_);
    if (own_stream_) cudaStreamDestroy(stream_);
  }

  std::string name() const override { return name_; }
  bool cuda_memory() const override { return true; }
  void* cuda_stream() const override { return stream_; }

  void* alloc(size_t bytes) override {
    select();
    void* p = nullptr;
    const cudaError_t e = cudaMalloc(&p, bytes == 0 ? 1 : bytes);
    if (e != cudaSuccess) {
      throw Error("cuda backend: cudaMalloc of " + std::to_string(bytes) +
                  " bytes: " + cudaGetErrorString(e));
    }
    return p;
  }
  void free(void* ptr) override {
    select();
    check_cuda(cudaFree(ptr), "cuda backend: cudaFree");
    ++epoch_;
  }
  void upload(void* dst, const void* host_src, size_t bytes) override {
    select();
    // From pageable memory the call returns once the source is staged: the caller may reuse it.
    if (bytes)
      check_cuda(cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyHostToDevice, stream_),
                 "cuda backend: upload");
  }
  void download(void* host_dst, const void* src, size_t bytes) override {
    select();
    if (bytes)
      check_cuda(cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDeviceToHost, stream_),
                 "cuda backend: download");
    check_cuda(cudaStreamSynchronize(stream_), "cuda backend: download (synchronize)");
    throw_device_error();
  }
  void memset(void* dst, int value, size_t bytes) override {
    select();
    if (bytes) check_cuda(cudaMemsetAsync(dst, value, bytes, stream_), "cuda backend: memset");
  }
  void synchronize() override {
    select();
    check_cuda(cudaStreamSynchronize(stream_), "cuda backend: synchronize");
    throw_device_error();
  }
  void upload_tensors(const std::vector<HostUpload>& uploads) override {
    select();
    // The copies run on the uploader's own streams: work queued here before must not see them
    // half done (nor they it).
    check_cuda(cudaStreamSynchronize(stream_), "cuda backend: upload_tensors (synchronize)");
    cuda::upload_tensors(device_, uploads);
  }

  bool records_graphs() const override { return true; }
  std::string capture_unsupported() const override {
    if (check_batch_) {
      return "FP8KV_CUDA_CHECK_BATCH=1 copies the batch arrays back in every call";
    }
    if (stream_ == nullptr) {
      return "the backend runs on the legacy default stream, which cannot be captured (make "
             "the backend with a stream of its own)";
    }
    return "";
  }

  void begin_capture() override {
    const std::string why = capture_unsupported();
    if (!why.empty()) throw Error("cuda backend: cannot record a graph: " + why);
    select();
    check_cuda(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal),
               "cuda backend: cudaStreamBeginCapture");
  }

  std::unique_ptr<StepGraph> end_capture(std::string* why) override {
    select();
    cudaGraph_t graph = nullptr;
    const cudaError_t e = cudaStreamEndCapture(stream_, &graph);
    if (e != cudaSuccess || graph == nullptr) {
      cudaGetLastError();  // an invalidated capture leaves its error behind; it is not sticky
      if (why) {
        *why = std::string("stream capture failed: ") + cudaGetErrorName(e) + ": " +
               cudaGetErrorString(e);
      }
      if (graph) cudaGraphDestroy(graph);
      return nullptr;
    }
    cudaGraphExec_t exec = nullptr;
    const cudaError_t ei = cudaGraphInstantiate(&exec, graph, 0);
    cudaGraphDestroy(graph);
    if (ei != cudaSuccess) {
      cudaGetLastError();
      if (why) {
        *why = std::string("cudaGraphInstantiate: ") + cudaGetErrorName(ei) + ": " +
               cudaGetErrorString(ei);
      }
      return nullptr;
    }
    return std::make_unique<CudaStepGraph>(device_, stream_, exec);
  }

  uint64_t memory_epoch() const override { return epoch_; }

  uint64_t decode_launch_key(const AttentionParams& p) const override {
    return cuda::decode_launch_key(p);
  }

  void quantize_kv(const QuantizeKvParams& p) override {
    validate_quantize_kv(p);
    if (p.num_tokens == 0) return;
    select();
    const SlotCheck check{p.slots, p.num_tokens, p.cache.num_slots};
    if (!p.slots_unchanged || !(check == last_slot_check_)) {
      cuda::launch_check_slots(p, bad_token_, stream_);
      last_slot_check_ = check;
    }
    // No host synchronization here (a decode step stays sync-free): a refused write is recorded
    // on the device and thrown by the next synchronize() or download(); at once in the debug
    // mode FP8KV_CUDA_CHECK_BATCH=1.
    cuda::launch_quantize_kv(p, bad_token_, device_error_, stream_);
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
    cuda::launch_prefill_attention(p, stream_, device_error_);
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
      ++epoch_;  // a recorded decode may point at the old workspace
      workspace_ = nullptr;
      workspace_bytes_ = 0;
      check_cuda(cudaMalloc(&workspace_, need), "cuda backend: cudaMalloc (decode workspace)");
      workspace_bytes_ = need;
      // Once per allocation: the split merge's counters start at zero and every launch leaves
      // them so (a per-launch clear would cost a node per graph and an operation per step).
      cuda::clear_decode_workspace(workspace_, need, stream_);
    }
    cuda::launch_decode_attention(p, workspace_, stream_, device_error_);
  }

 private:
  void select() { check_cuda(cudaSetDevice(device_), "cuda backend: cudaSetDevice"); }

  void check_batch_on_host(const AttentionParams& p, AttentionPhase phase) {
    const AttentionBatch& b = p.batch;
    const size_t B = static_cast<size_t>(b.num_requests);
    const auto seq_len = to_host(b.seq_len, B, stream_);
    const auto cu = to_host(b.cu_seqlens_q, B + 1, stream_);
    const auto req_index = to_host(b.req_index, B, stream_);
    const auto table =
        to_host(b.req_to_token, static_cast<size_t>(b.max_requests) * b.max_len, stream_);
    const auto order =
        b.decode_order != nullptr ? to_host(b.decode_order, B, stream_) : std::vector<int32_t>();
    AttentionBatch host = b;
    if (b.decode_order != nullptr) host.decode_order = order.data();
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
  // What bad_token_ holds the check of (QuantizeKvParams::slots_unchanged).
  struct SlotCheck {
    const int32_t* slots = nullptr;
    int64_t num_tokens = -1;
    int64_t num_slots = -1;
    bool operator==(const SlotCheck& o) const {
      return slots == o.slots && num_tokens == o.num_tokens && num_slots == o.num_slots;
    }
  };
  SlotCheck last_slot_check_;
  cuda::DeviceError* device_error_ = nullptr;  // the first refusal of a kernel not yet reported

  // After a stream synchronization: throws (once) the refusal a kernel recorded.
  void throw_device_error() {
    // Read and reset on the backend's stream, ordered with its kernels (see the constructor).
    cuda::DeviceError e{};
    check_cuda(cudaMemcpyAsync(&e, device_error_, sizeof e, cudaMemcpyDeviceToHost, stream_),
               "cuda backend: error check");
    check_cuda(cudaStreamSynchronize(stream_), "cuda backend: error check");
    if (e.index == ULLONG_MAX) return;
    check_cuda(cudaMemsetAsync(device_error_, 0xff, sizeof e, stream_),
               "cuda backend: error check reset");
    const std::string value = std::to_string(static_cast<long long>(e.value));
    const std::string bound = std::to_string(static_cast<long long>(e.bound));
    switch (static_cast<cuda::DeviceErrorKind>(e.kind)) {
      case cuda::DeviceErrorKind::kQuantizeSlot:
        throw Error("quantize_kv: token " + std::to_string(e.index) + ": slot " + value +
                    " out of [0, num_slots " + bound + ") (nothing written)");
      case cuda::DeviceErrorKind::kPrefillRequest:
      case cuda::DeviceErrorKind::kDecodeRequest: {
        const bool decode =
            static_cast<cuda::DeviceErrorKind>(e.kind) == cuda::DeviceErrorKind::kDecodeRequest;
        throw Error(std::string(decode ? "decode_attention" : "prefill_attention") +
                    ": b_req_idx[" + std::to_string(e.index) + "] = " + value +
                    " out of [0, max_requests " + bound +
                    ") (that request was skipped: its rows of the output are undefined)");
      }
      case cuda::DeviceErrorKind::kDecodeOrder:
        throw Error("decode_attention: batch.decode_order[" + std::to_string(e.index) +
                    "] = " + value + " out of [0, num_requests " + bound +
                    ") (no request was computed in its place: rows of the output are undefined)");
    }
    throw Error("cuda backend: unknown device error kind " + std::to_string(e.kind));
  }
  void* workspace_ = nullptr;  // split-KV partials of decode and their merge's counters
  size_t workspace_bytes_ = 0;
  bool check_batch_ = false;
  uint64_t epoch_ = 0;  // memory_epoch()
  bool own_stream_ = false;
};

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(int device, void* stream) {
  return std::make_unique<CudaBackend>(device, static_cast<cudaStream_t>(stream));
}

std::unique_ptr<Backend> make_cuda_backend_own_stream(int device) {
  return std::make_unique<CudaBackend>(device, nullptr, true);
}

bool cuda_available() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    cudaGetLastError();  // clear the sticky "no device" error
    return false;
  }
  for (int d = 0; d < count; ++d) {
    int major = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, d) == cudaSuccess &&
        major == 9)
      return true;
  }
  return false;
}

}  // namespace fp8kv
