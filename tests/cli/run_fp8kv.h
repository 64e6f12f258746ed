// Runs the built fp8kv binary (FP8KV_BINARY) for the CLI tests.
#pragma once

#include <gtest/gtest.h>
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <string>

namespace fp8kv::testing {

struct RunResult {
  int exit_code = -1;
  std::string output;  // stdout, and stderr too unless it was dropped
};

// `fp8kv ARGS`; stderr is merged into the output, or dropped when `with_stderr` is false (for
// tests that parse what the command prints on stdout).
inline RunResult run_fp8kv(const std::string& args, bool with_stderr = true) {
  const std::string command = std::string("'") + FP8KV_BINARY + "' " + args +
                              (with_stderr ? " 2>&1" : " 2>/dev/null");
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

inline bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

}  // namespace fp8kv::testing
