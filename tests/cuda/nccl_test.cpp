// The NCCL Communicator across real processes and GPUs: the test starts one child process per
// GPU (itself, filtered to the child body) and checks gather order, NaN-propagating max, sum,
// and an observer finalize that must equal the one-process result value for value. Skipped with
// fewer than two GPUs or without NCCL.
#include <gtest/gtest.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "fp8kv/nccl.h"
#include "fp8kv/observer.h"

#if defined(FP8KV_HAVE_CUDA)
#include <cuda_runtime.h>
#endif

extern char** environ;

namespace fp8kv {
namespace {

constexpr int kLayers = 2, kHeadsPerRank = 2;

// The amax a rank records for (layer, local column): distinct per global head.
float amax_of(int rank, int layer, int column) {
  return 0.5f + layer * 10.0f + rank * kHeadsPerRank + (column % kHeadsPerRank) +
         (column >= kHeadsPerRank ? 100.0f : 0.0f);
}

// The body each child process runs (selected by the environment, not by a normal test run).
TEST(NcclChild, Body) {
  const char* rank_text = std::getenv("FP8KV_NCCL_RANK");
  if (rank_text == nullptr) GTEST_SKIP() << "runs only as a child of NcclCommunicator.*";
  const int rank = std::atoi(rank_text);
  const int world = std::atoi(std::getenv("FP8KV_NCCL_WORLD"));
  auto comm = make_nccl_communicator(rank, world, rank, std::getenv("FP8KV_NCCL_FILE"));
  ASSERT_EQ(comm->rank(), rank);

  std::vector<float> mine = {static_cast<float>(rank), static_cast<float>(rank * 10)};
  std::vector<float> all(2 * world);
  comm->all_gather(mine.data(), all.data(), 2);
  for (int r = 0; r < world; ++r) {
    EXPECT_EQ(all[2 * r], r);
    EXPECT_EQ(all[2 * r + 1], r * 10);
  }
  std::vector<float> m = {static_cast<float>(rank), rank == 1 ? NAN : 1.0f};
  comm->all_reduce_max(m.data(), 2);
  EXPECT_EQ(m[0], world - 1);
  EXPECT_TRUE(std::isnan(m[1]));
  // Sums of small integers are exact in any order; every rank gets the total.
  std::vector<float> sum = {static_cast<float>(rank + 1), 0.5f};
  comm->all_reduce_sum(sum.data(), 2);
  EXPECT_EQ(sum[0], world * (world + 1) / 2);
  EXPECT_EQ(sum[1], 0.5f * world);
#if defined(FP8KV_HAVE_CUDA)
  // The same on a device buffer, on the default stream (the model runner's fast path).
  float* dev = nullptr;
  ASSERT_EQ(cudaMalloc(&dev, 2 * sizeof(float)), cudaSuccess);
  const std::vector<float> mine2 = {static_cast<float>(rank + 1), 0.25f};
  ASSERT_EQ(cudaMemcpy(dev, mine2.data(), 2 * sizeof(float), cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_TRUE(comm->all_reduce_sum_cuda(dev, 2, nullptr));
  std::vector<float> back(2);
  ASSERT_EQ(cudaMemcpy(back.data(), dev, 2 * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(back[0], world * (world + 1) / 2);
  EXPECT_EQ(back[1], 0.25f * world);
  cudaFree(dev);
#endif

  for (QuantType type : {QuantType::kPerHead, QuantType::kPerTensor}) {
    ObserverConfig c;
    c.num_layers = kLayers;
    c.num_kv_heads = kHeadsPerRank;
    c.quant_type = type;
    c.count = 1;
    Observer part(c);
    Observer whole([&] {
      ObserverConfig w = c;
      w.num_kv_heads = kHeadsPerRank * world;
      return w;
    }());
    for (int l = 0; l < kLayers; ++l) {
      std::vector<float> local(2 * kHeadsPerRank), global(2 * kHeadsPerRank * world);
      for (int i = 0; i < 2 * kHeadsPerRank; ++i) local[i] = amax_of(rank, l, i);
      for (int r = 0; r < world; ++r) {
        for (int i = 0; i < kHeadsPerRank; ++i) {
          global[r * kHeadsPerRank + i] = amax_of(r, l, i);
          global[kHeadsPerRank * world + r * kHeadsPerRank + i] = amax_of(r, l, kHeadsPerRank + i);
        }
      }
      part.record(l, local.data());
      whole.record(l, global.data());
    }
    auto single = make_single_communicator();
    EXPECT_EQ(part.finalize(*comm, "X").scales, whole.finalize(*single, "X").scales);
  }
}

TEST(NcclCommunicator, TwoProcessesAgree) {
#if !defined(FP8KV_HAVE_NCCL)
  GTEST_SKIP() << "built without NCCL";
#else
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices < 2) {
    GTEST_SKIP() << "needs 2 GPUs, found " << devices;
  }
  const int world = 2;
  const std::string file = ::testing::TempDir() + "fp8kv_nccl_" + std::to_string(getpid());
  std::remove(file.c_str());
  char self[4096];
  const ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
  ASSERT_GT(n, 0);
  self[n] = '\0';
  std::vector<pid_t> children;
  for (int r = 0; r < world; ++r) {
    setenv("FP8KV_NCCL_RANK", std::to_string(r).c_str(), 1);
    setenv("FP8KV_NCCL_WORLD", std::to_string(world).c_str(), 1);
    setenv("FP8KV_NCCL_FILE", file.c_str(), 1);
    std::string filter = "--gtest_filter=NcclChild.Body";
    char* argv[] = {self, filter.data(), nullptr};
    pid_t pid;
    ASSERT_EQ(posix_spawn(&pid, self, nullptr, nullptr, argv, environ), 0);
    children.push_back(pid);
  }
  unsetenv("FP8KV_NCCL_RANK");
  for (pid_t pid : children) {
    int status = 0;
    ASSERT_EQ(waitpid(pid, &status, 0), pid);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "child " << pid << " failed";
  }
  std::remove(file.c_str());
#endif
}

}  // namespace
}  // namespace fp8kv
