// The Communicator interface: collectives over tensor-parallel ranks. Implementations: one
// process alone (make_single_communicator), ranks as threads (fp8kv/threaded_communicator.h),
// one process per GPU over NCCL (fp8kv/nccl.h).
#pragma once

#include <cstddef>
#include <memory>

#include "fp8kv/export.h"

namespace fp8kv {

// Collective operations over tensor-parallel ranks, on host float buffers.
class FP8KV_API Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  // out[r * count + i] = in_of_rank_r[i]; out has world_size() * count elements.
  virtual void all_gather(const float* in, float* out, size_t count) = 0;
  // buf[i] = max over ranks of buf[i], in place. NaN wins over any number.
  virtual void all_reduce_max(float* buf, size_t count) = 0;
  // buf[i] = sum over ranks of buf[i], in place. Every rank gets the same bits (the
  // tensor-parallel model relies on it: its replicated residual stream must not drift apart).
  virtual void all_reduce_sum(float* buf, size_t count) = 0;
  // all_reduce_sum on a buffer in this rank's CUDA device memory, queued on `stream` (a
  // cudaStream_t; null: the default stream), with no host copy. Returns false, doing nothing,
  // where the communicator has no device path (the caller stages through the host then).
  virtual bool all_reduce_sum_cuda(float* /*buf*/, size_t /*count*/, void* /*stream*/) {
    return false;
  }
};

// One process, one rank.
FP8KV_API std::unique_ptr<Communicator> make_single_communicator();

}  // namespace fp8kv
