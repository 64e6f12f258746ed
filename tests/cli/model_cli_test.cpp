// fp8kv make-model / calibrate / eval / generate, run as the built binary.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include "runtime/test_util.h"

namespace fp8kv {
namespace {

struct RunResult {
  int exit_code = -1;
  std::string output;  // stdout and stderr together
};

RunResult run(const std::string& args) {
  const std::string command = std::string("'") + FP8KV_BINARY + "' " + args + " 2>&1";
  RunResult result;
  FILE* pipe = ::popen(command.c_str(), "r");
  if (pipe == nullptr) {
    ADD_FAILURE() << "popen failed: " << command;
    return result;
  }
  std::array<char, 4096> buffer;
  size_t n;
  while ((n = std::fread(buffer.data(), 1, buffer.size(), pipe)) > 0) {
    result.output.append(buffer.data(), n);
  }
  const int status = ::pclose(pipe);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return result;
}

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

TEST(ModelCli, MakeCalibrateGenerateEval) {
  TempDir dir;
  const std::string model = dir.path() + "/tiny";
  RunResult r = run("make-model " + model + " --preset tiny");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "LlamaForCausalLM, 4 layers")) << r.output;

  const std::string data = dir.path() + "/data.jsonl";
  {
    std::ofstream out(data);
    out << "{\"input_ids\": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]}\n\n"
        << "{\"input_ids\": [100, 200, 300, 400, 500, 600]}\n"
        << "{\"input_ids\": [2047, 0, 17, 33, 99, 1024, 5, 6, 7]}\n";
  }
  const std::string per_head = dir.path() + "/ph.json", per_tensor = dir.path() + "/pt.json";
  r = run("calibrate --model " + model + " --data " + data + " --scheme per-head --out " +
          per_head + " --batch 2");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "observed 2 forward passes")) << r.output;
  EXPECT_TRUE(std::filesystem::exists(per_head));
  r = run("calibrate --model " + model + " --data " + data + " --scheme per-tensor --out " +
          per_tensor + " --count 1");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "observed 1 forward passes")) << r.output;

  r = run("generate --model " + model + " --input-ids 1,2,3 --input-ids 4,5 --max-new 4");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "generated 2 x 4 tokens with a bf16 cache")) << r.output;
  r = run("generate --model " + model + " --kv fp8-per-head --calib " + per_head +
          " --input-ids 1,2,3 --max-new 3");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = run("generate --model " + model + " --kv fp8-per-head --calib " + per_tensor +
          " --input-ids 1,2,3");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_TRUE(contains(r.output, "per_tensor")) << r.output;

  r = run("eval --model " + model + " --data " + data + " --per-head-calib " + per_head +
          " --batch 2");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "scales from " + per_head)) << r.output;
  EXPECT_TRUE(contains(r.output, "fp8-per-tensor: no calibration file given; calibrating"))
      << r.output;
  EXPECT_TRUE(contains(r.output, "perplexity")) << r.output;
  EXPECT_TRUE(contains(r.output, "top-1 agreement")) << r.output;
  EXPECT_TRUE(contains(r.output, "attn-out rel. error, layer 3")) << r.output;

  r = run("bench model --model " + model + " --batch 2 --prompt-len 8 --decode 2");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "prefill tok/s")) << r.output;
  EXPECT_TRUE(contains(r.output, "fp8-per-head")) << r.output;
}

TEST(ModelCli, DemoEndToEndSmall) {
  TempDir dir;
  const RunResult r = run("demo --out " + dir.path() + " --sequences 2 --len 12");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  for (const char* part : {"[5/5]", "perplexity", "KL vs bf16", "fp8-per-tensor", "demo done"}) {
    EXPECT_TRUE(contains(r.output, part)) << part << "\n" << r.output;
  }
  EXPECT_TRUE(std::filesystem::exists(dir.path() + "/kv_cache_calib_per_head.json"));
  EXPECT_TRUE(std::filesystem::exists(dir.path() + "/eval.jsonl"));
}

TEST(ModelCli, Refusals) {
  TempDir dir;
  const std::string model = dir.path() + "/m";
  ASSERT_EQ(run("make-model " + model + " --preset qwen2-tiny").exit_code, 0);
  RunResult r = run("generate --model " + model + " --kv fp8-per-tensor --input-ids 1,2");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(contains(r.output, "needs --calib")) << r.output;
  r = run("generate --model " + model + " --input-ids 1,x");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(contains(r.output, "'x' is not a token id")) << r.output;
  r = run("make-model " + model + " --preset huge");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(contains(r.output, "presets: tiny")) << r.output;

  const std::string data = dir.path() + "/bad.jsonl";
  {
    std::ofstream out(data);
    out << "{\"input_ids\": [1, 2]}\n{\"input_ids\": [1, 2048]}\n";
  }
  r = run("calibrate --model " + model + " --data " + data + " --out " + dir.path() + "/c.json");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(contains(r.output, data + ":2")) << r.output;
  EXPECT_FALSE(std::filesystem::exists(dir.path() + "/c.json"));
}

}  // namespace
}  // namespace fp8kv
