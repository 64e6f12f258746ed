// fp8kv generate --dump-logits: the file the HF oracle (scripts/oracle.py) reads.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "cli/run_fp8kv.h"
#include "runtime/test_util.h"

namespace fp8kv {
namespace {

// fp8kv ARGS with stdout appended to *out (stderr dropped); returns the exit code.
int run(const std::string& args, std::string* out) {
  const testing::RunResult r = testing::run_fp8kv(args, /*with_stderr=*/false);
  *out += r.output;
  return r.exit_code;
}

// Rows: every prompt position, then every decode step; each chosen token is its row's argmax.
TEST(GenerateDump, RowsAreThePromptAndEachStepAndArgmaxIsTheToken) {
  TempDir dir;
  const std::string model = dir.path() + "/tiny", dump = dir.path() + "/logits.bin";
  std::string out;
  ASSERT_EQ(run("make-model " + model + " --preset tiny", &out), 0) << out;
  const int prompt = 5, steps = 6, vocab = 2048;  // the tiny preset's vocabulary
  out.clear();
  ASSERT_EQ(run("generate --model " + model + " --input-ids 3,1,4,1,5 --max-new " +
                    std::to_string(steps) + " --dump-logits " + dump,
                &out),
            0)
      << out;
  std::vector<int> tokens;
  std::stringstream line(out.substr(0, out.find('\n')));
  for (std::string t; std::getline(line, t, ',');) tokens.push_back(std::stoi(t));
  ASSERT_EQ(static_cast<int>(tokens.size()), steps) << out;

  std::ifstream in(dump, std::ios::binary);
  std::vector<float> logits((prompt + steps - 1) * vocab);
  in.read(reinterpret_cast<char*>(logits.data()), logits.size() * sizeof(float));
  ASSERT_TRUE(in) << "dump shorter than [prompt + max_new - 1, vocab]";
  EXPECT_EQ(in.peek(), EOF) << "dump longer than [prompt + max_new - 1, vocab]";
  for (int i = 0; i < steps; ++i) {
    const float* row = logits.data() + (prompt - 1 + i) * vocab;
    EXPECT_EQ(std::max_element(row, row + vocab) - row, tokens[i]) << "step " << i;
  }
  // Two prompts cannot share one dump: refused, no file left.
  out.clear();
  const std::string dump2 = dir.path() + "/two.bin";
  EXPECT_EQ(
      run("generate --model " + model + " --input-ids 1,2 --input-ids 3 --dump-logits " + dump2,
          &out),
      1);
  EXPECT_FALSE(std::filesystem::exists(dump2));
}

}  // namespace
}  // namespace fp8kv
