// `--tp 2 --device cuda` through the CLI: one process per GPU over NCCL (src/cli/parallel.cpp).
// The calibration file must be the --tp 1 --device cuda file value for value in every layer
// (calibrate runs exact_tp: fixed-order GEMMs whose rank shards are subtrees of the tp 1 sum,
// see tests/runtime/tensor_parallel_test.cpp), and greedy generation
// with an FP8 cache must give the tp 1 tokens. Skipped with fewer than 2 GPUs or without NCCL.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>

#include "cli/run_fp8kv.h"
#include "fp8kv/calib.h"
#include "fp8kv/backend.h"
#include "runtime/test_util.h"

#if defined(FP8KV_HAVE_CUDA)
#include <cuda_runtime.h>
#endif

namespace fp8kv {
namespace {

using testing::contains;
using testing::token_lines;
using testing::RunResult;
RunResult run(const std::string& args) { return testing::run_fp8kv(args); }

int gpus_usable() {
#if defined(FP8KV_HAVE_CUDA)
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return cuda_available() ? n : 0;
#else
  return 0;
#endif
}

TEST(TensorParallelCli, CudaTp2MatchesTp1) {
#if !defined(FP8KV_HAVE_NCCL)
  GTEST_SKIP() << "built without NCCL";
#endif
  const int gpus = gpus_usable();
  if (gpus < 2) GTEST_SKIP() << "needs 2 GPUs, found " << gpus;

  TempDir dir;
  const std::string model = dir.path() + "/tiny";
  RunResult r = run("make-model " + model + " --preset tiny");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::string data = dir.path() + "/data.jsonl";
  testing::write_tiny_token_data(data);
  const std::string per_head = dir.path() + "/tp1-per-head.json";
  for (const std::string scheme : {"per-head", "per-tensor"}) {
    const std::string one = dir.path() + "/tp1-" + scheme + ".json";
    const std::string two = dir.path() + "/tp2-" + scheme + ".json";
    const std::string base = "calibrate --model " + model + " --data " + data + " --scheme " +
                             scheme + " --batch 2 --device cuda --out ";
    r = run(base + one);
    ASSERT_EQ(r.exit_code, 0) << r.output;
    r = run(base + two + " --tp 2");
    ASSERT_EQ(r.exit_code, 0) << r.output;
    EXPECT_TRUE(contains(r.output, "tensor parallel: 2 ranks")) << r.output;
    const CalibData a = load_calib(one), b = load_calib(two);
    ASSERT_EQ(a.num_layers, b.num_layers);
    ASSERT_EQ(a.scales.size(), b.scales.size());
    const int width = a.row_width();
    for (int l = 0; l < a.num_layers; ++l) {
      int differ = 0;
      for (int i = 0; i < width; ++i) {
        const size_t at = static_cast<size_t>(l * width + i);
        EXPECT_EQ(a.scales[at], b.scales[at]) << scheme << " layer " << l << " column " << i;
        differ += a.scales[at] != b.scales[at];
      }
      std::printf("%s layer %d: %d of %d scales differ from tp 1\n", scheme.c_str(), l, differ,
                  width);
    }
  }

  const std::string args = "generate --model " + model + " --device cuda --kv fp8-per-head " +
                           "--calib " + per_head +
                           " --input-ids 1,2,3,4 --input-ids 9,8 --max-new 6";
  const RunResult one = run(args);
  const RunResult two = run(args + " --tp 2");
  ASSERT_EQ(one.exit_code, 0) << one.output;
  ASSERT_EQ(two.exit_code, 0) << two.output;
  EXPECT_FALSE(token_lines(one.output).empty()) << one.output;
  EXPECT_EQ(token_lines(one.output), token_lines(two.output));

  // More ranks than GPUs: a clear refusal from the parent, before any child starts.
  r = run(args + " --tp " + std::to_string(gpus + 1));
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_TRUE(contains(r.output, "GPUs, found " + std::to_string(gpus))) << r.output;
}

}  // namespace
}  // namespace fp8kv
