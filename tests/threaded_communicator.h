// A test double of Communicator: N ranks as N threads of one process, sharing memory. It lets
// the tests run tensor-parallel reductions (gather, max) without GPUs or NCCL.
#pragma once

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "fp8kv/observer.h"

namespace fp8kv::testing {

class ThreadedGroup {
 public:
  explicit ThreadedGroup(int world) : world_(world), slots_(world) {}

  // Runs body(comm) on `world` threads, one per rank, and joins them.
  void run(const std::function<void(Communicator&)>& body);

 private:
  friend class ThreadedCommunicator;
  // Blocks until all ranks arrived (a reusable barrier).
  void barrier() {
    std::unique_lock<std::mutex> lock(mutex_);
    const int generation = generation_;
    if (++arrived_ == world_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return generation != generation_; });
    }
  }

  int world_;
  std::vector<std::vector<float>> slots_;  // [world] each rank's contribution
  std::mutex mutex_;
  std::condition_variable cv_;
  int arrived_ = 0;
  int generation_ = 0;
};

class ThreadedCommunicator final : public Communicator {
 public:
  ThreadedCommunicator(ThreadedGroup& group, int rank) : group_(group), rank_(rank) {}
  int rank() const override { return rank_; }
  int world_size() const override { return group_.world_; }

  void all_gather(const float* in, float* out, size_t count) override {
    group_.slots_[rank_].assign(in, in + count);
    group_.barrier();
    for (int r = 0; r < group_.world_; ++r) {
      std::copy(group_.slots_[r].begin(), group_.slots_[r].end(), out + r * count);
    }
    group_.barrier();
  }

  void all_reduce_max(float* buf, size_t count) override {
    std::vector<float> all(count * group_.world_);
    all_gather(buf, all.data(), count);
    for (size_t i = 0; i < count; ++i) {
      float m = all[i];
      for (int r = 1; r < group_.world_; ++r) {
        const float v = all[r * count + i];
        m = (std::isnan(m) || std::isnan(v)) ? NAN : std::max(m, v);
      }
      buf[i] = m;
    }
  }

 private:
  ThreadedGroup& group_;
  int rank_;
};

inline void ThreadedGroup::run(const std::function<void(Communicator&)>& body) {
  std::vector<std::thread> threads;
  for (int r = 0; r < world_; ++r) {
    threads.emplace_back([this, r, &body] {
      ThreadedCommunicator comm(*this, r);
      body(comm);
    });
  }
  for (auto& t : threads) t.join();
}

}  // namespace fp8kv::testing
