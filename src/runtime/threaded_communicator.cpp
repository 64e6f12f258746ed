// The in-process Communicator (include/fp8kv/communicator.h).
#include <algorithm>
#include <cmath>
#include <exception>
#include <string>
#include <thread>

#include "fp8kv/threaded_communicator.h"
#include "fp8kv/error.h"

namespace fp8kv {

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
    group_.barrier();  // nobody overwrites a slot before every rank has read it
  }

  void all_reduce_max(float* buf, size_t count) override {
    reduce(buf, count, [](float m, float v) {
      return (std::isnan(m) || std::isnan(v)) ? NAN : std::max(m, v);
    });
  }

  // Summed in rank order 0, 1, ... on every rank, so every rank gets the same bits.
  void all_reduce_sum(float* buf, size_t count) override {
    reduce(buf, count, [](float s, float v) { return s + v; });
  }

 private:
  template <typename Op>
  void reduce(float* buf, size_t count, Op op) {
    group_.slots_[rank_].assign(buf, buf + count);
    group_.barrier();
    for (size_t i = 0; i < count; ++i) {
      float acc = group_.slots_[0][i];
      for (int r = 1; r < group_.world_; ++r) acc = op(acc, group_.slots_[r][i]);
      buf[i] = acc;
    }
    group_.barrier();
  }

  ThreadedGroup& group_;
  int rank_;
};

ThreadedGroup::ThreadedGroup(int world) : world_(world), slots_(world > 0 ? world : 0) {
  if (world < 1)
    throw Error("threaded communicator: world size must be >= 1, got " + std::to_string(world));
}

void ThreadedGroup::barrier() {
  std::unique_lock<std::mutex> lock(mutex_);
  if (aborted_) throw Error("threaded communicator: another rank failed");
  const int generation = generation_;
  if (++arrived_ == world_) {
    arrived_ = 0;
    ++generation_;
    cv_.notify_all();
  } else {
    cv_.wait(lock, [&] { return generation != generation_ || aborted_; });
    if (generation == generation_) throw Error("threaded communicator: another rank failed");
  }
}

void ThreadedGroup::abort() {
  std::lock_guard<std::mutex> lock(mutex_);
  aborted_ = true;
  cv_.notify_all();
}

void ThreadedGroup::run(const std::function<void(Communicator&)>& body) {
  std::vector<std::exception_ptr> errors(static_cast<size_t>(world_));
  std::mutex first_mutex;
  int first = -1;  // the rank that failed first (the others may fail because it did)
  std::vector<std::thread> threads;
  for (int r = 0; r < world_; ++r) {
    threads.emplace_back([&, r] {
      try {
        ThreadedCommunicator comm(*this, r);
        body(comm);
      } catch (...) {
        errors[static_cast<size_t>(r)] = std::current_exception();
        {
          std::lock_guard<std::mutex> lock(first_mutex);
          if (first < 0) first = r;
        }
        abort();
      }
    });
  }
  for (auto& t : threads) t.join();
  if (first >= 0) std::rethrow_exception(errors[static_cast<size_t>(first)]);
}

void run_ranks(int world, const std::function<void(Communicator&)>& body) {
  ThreadedGroup(world).run(body);
}

}  // namespace fp8kv
