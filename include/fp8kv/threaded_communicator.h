// In-process Communicator: N ranks as N threads of one process, sharing memory. The CLI runs
// `--tp N --device cpu` on it, and the tests run tensor-parallel code on it without GPUs or NCCL.
// (The NCCL Communicator, one process per GPU, is in fp8kv/nccl.h.)
#pragma once

#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "fp8kv/communicator.h"
#include "fp8kv/export.h"

namespace fp8kv {

// The shared state of one group of thread ranks: a reusable barrier and one slot per rank.
class FP8KV_API ThreadedGroup {
 public:
  explicit ThreadedGroup(int world);

  int world_size() const { return world_; }
  // Runs body(comm) on `world` threads, one per rank, and joins them. When a rank throws, the
  // group is aborted (ranks waiting in a collective throw too, instead of hanging) and the
  // first rank's exception is rethrown here after every thread has ended.
  void run(const std::function<void(Communicator&)>& body);

 private:
  friend class ThreadedCommunicator;
  // Blocks until all ranks arrived; throws Error when the group was aborted.
  void barrier();
  void abort();

  int world_;
  std::vector<std::vector<float>> slots_;  // [world] each rank's contribution
  std::mutex mutex_;
  std::condition_variable cv_;
  int arrived_ = 0;
  int generation_ = 0;
  bool aborted_ = false;
};

// run_ranks(world, fn): ThreadedGroup(world).run(fn).
FP8KV_API void run_ranks(int world, const std::function<void(Communicator&)>& body);

}  // namespace fp8kv
