// NCCL implementation of Communicator (include/fp8kv/nccl.h). Buffers are small (one row of
// scales per layer), so each collective stages through device memory and synchronizes.
#include "fp8kv/nccl.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "fp8kv/error.h"

#if defined(FP8KV_HAVE_NCCL)
#include <cuda_runtime.h>
#include <nccl.h>

#include "kernels/cuda/check.h"
#endif

namespace fp8kv {

void set_nccl_safety_env() {
  // NVLink multicast can take a shared host's GPUs out of service: keep it off everywhere.
  setenv("NCCL_NVLS_ENABLE", "0", 1);
  setenv("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1", 1);
  setenv("NVSHMEM_DISABLE_NVLS", "1", 1);
}

#if defined(FP8KV_HAVE_NCCL)
namespace {

using cuda::check_cuda;

void check_nccl(ncclResult_t res, const char* what) {
  if (res != ncclSuccess) {
    throw Error(std::string("nccl communicator: ") + what + ": " + ncclGetErrorString(res));
  }
}

ncclUniqueId rendezvous_id(int rank, const std::string& path, double timeout_s) {
  ncclUniqueId id;
  if (rank == 0) {
    check_nccl(ncclGetUniqueId(&id), "ncclGetUniqueId");
    const std::string tmp = path + ".tmp";
    {
      std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
      out.write(reinterpret_cast<const char*>(&id), sizeof id);
      if (!out) throw Error("nccl communicator: cannot write rendezvous file " + tmp);
    }
    if (std::rename(tmp.c_str(), path.c_str()) != 0) {
      throw Error("nccl communicator: cannot publish rendezvous file " + path);
    }
    return id;
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  while (true) {
    std::ifstream in(path, std::ios::binary);
    if (in && in.read(reinterpret_cast<char*>(&id), sizeof id)) return id;
    if (std::chrono::steady_clock::now() > deadline) {
      throw Error("nccl communicator: rank " + std::to_string(rank) + " waited " +
                  std::to_string(timeout_s) + " s for rendezvous file " + path);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(int rank, int world, int device, const std::string& rendezvous, double timeout_s)
      : rank_(rank), world_(world) {
    if (world < 1 || rank < 0 || rank >= world) {
      throw Error("nccl communicator: rank " + std::to_string(rank) + " not in [0, " +
                  std::to_string(world) + ")");
    }
    set_nccl_safety_env();
    check_cuda(cudaSetDevice(device), "nccl communicator: cudaSetDevice");
    const ncclUniqueId id = rendezvous_id(rank, rendezvous, timeout_s);
    check_nccl(ncclCommInitRank(&comm_, world, id, rank), "ncclCommInitRank");
    check_cuda(cudaStreamCreate(&stream_), "nccl communicator: cudaStreamCreate");
  }
  ~NcclCommunicator() override {
    if (buffer_) cudaFree(buffer_);
    if (stream_) cudaStreamDestroy(stream_);
    if (comm_) ncclCommDestroy(comm_);
  }

  int rank() const override { return rank_; }
  int world_size() const override { return world_; }

  void all_gather(const float* in, float* out, size_t count) override {
    float* dev = reserve(count * (world_ + 1));
    float* dev_in = dev + count * world_;
    check_cuda(cudaMemcpyAsync(dev_in, in, count * sizeof(float), cudaMemcpyHostToDevice, stream_),
               "nccl communicator: upload");
    check_nccl(ncclAllGather(dev_in, dev, count, ncclFloat32, comm_, stream_), "ncclAllGather");
    check_cuda(
        cudaMemcpyAsync(out, dev, count * world_ * sizeof(float), cudaMemcpyDeviceToHost, stream_),
        "nccl communicator: download");
    check_cuda(cudaStreamSynchronize(stream_), "nccl communicator: synchronize");
  }

  // Through all_gather rather than ncclMax, so that NaN wins over any number on every rank
  // exactly as in the single-process path (NCCL's max does not promise NaN propagation).
  void all_reduce_max(float* buf, size_t count) override {
    std::vector<float> all(count * world_);
    all_gather(buf, all.data(), count);
    for (size_t i = 0; i < count; ++i) {
      float m = all[i];
      for (int r = 1; r < world_; ++r) {
        const float v = all[r * count + i];
        m = (std::isnan(m) || std::isnan(v)) ? NAN : (v > m ? v : m);
      }
      buf[i] = m;
    }
  }

  // ncclSum: NCCL's ring and tree algorithms hand every rank the same reduced bits.
  void all_reduce_sum(float* buf, size_t count) override {
    float* dev = reserve(count);
    check_cuda(cudaMemcpyAsync(dev, buf, count * sizeof(float), cudaMemcpyHostToDevice, stream_),
               "nccl communicator: upload");
    check_nccl(ncclAllReduce(dev, dev, count, ncclFloat32, ncclSum, comm_, stream_),
               "ncclAllReduce");
    check_cuda(cudaMemcpyAsync(buf, dev, count * sizeof(float), cudaMemcpyDeviceToHost, stream_),
               "nccl communicator: download");
    check_cuda(cudaStreamSynchronize(stream_), "nccl communicator: synchronize");
  }

  // In place on the caller's device buffer and stream: no staging, no synchronization.
  bool all_reduce_sum_cuda(float* buf, size_t count, void* stream) override {
    check_nccl(ncclAllReduce(buf, buf, count, ncclFloat32, ncclSum, comm_,
                             static_cast<cudaStream_t>(stream)),
               "ncclAllReduce (device buffer)");
    return true;
  }

 private:
  float* reserve(size_t floats) {
    if (floats > capacity_) {
      if (buffer_) cudaFree(buffer_);
      buffer_ = nullptr;
      check_cuda(cudaMalloc(&buffer_, floats * sizeof(float)), "nccl communicator: cudaMalloc");
      capacity_ = floats;
    }
    return buffer_;
  }

  int rank_, world_;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  float* buffer_ = nullptr;
  size_t capacity_ = 0;
};

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(int rank, int world, int device,
                                                     const std::string& rendezvous,
                                                     double timeout_s) {
  return std::make_unique<NcclCommunicator>(rank, world, device, rendezvous, timeout_s);
}

#else  // no NCCL

std::unique_ptr<Communicator> make_nccl_communicator(int, int, int, const std::string&, double) {
  throw Error(
      "NCCL communicator: this fp8kv was built without NCCL (a CUDA build with NCCL found)");
}

#endif

}  // namespace fp8kv
