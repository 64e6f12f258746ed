// Runs the built fp8kv binary (FP8KV_BINARY) for the CLI tests.
#pragma once

#include <gtest/gtest.h>
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>

namespace fp8kv::testing {

struct RunResult {
  int exit_code = -1;
  std::string output;  // stdout, and stderr too unless it was dropped
};

// `fp8kv ARGS`; stderr is merged into the output, or dropped when `with_stderr` is false (for
// tests that parse what the command prints on stdout). The model commands run on the CPU
// (FP8KV_DEVICE=cpu, unless ARGS say --device or FP8KV_DEVICE): the tests' expectations were
// made there, and their default, --device auto, would pick a GPU where there is one.
inline RunResult run_fp8kv(const std::string& args, bool with_stderr = true) {
  const bool device_given =
      args.find("--device") != std::string::npos || args.find("FP8KV_DEVICE") != std::string::npos;
  const std::string command = std::string(device_given ? "" : "FP8KV_DEVICE=cpu ") + "'" +
                              FP8KV_BINARY + "' " + args + (with_stderr ? " 2>&1" : " 2>/dev/null");
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

// The lines of `output` that are comma-separated token ids (generate's stdout), in order:
// progress and timing lines differ from run to run.
inline std::string token_lines(const std::string& output) {
  std::string out, line;
  std::istringstream in(output);
  while (std::getline(in, line)) {
    if (!line.empty() && line.find_first_not_of("0123456789,") == std::string::npos) {
      out += line + "\n";
    }
  }
  return out;
}

// Three sequences of token ids for the tiny preset (vocabulary 2048), as a JSONL file: the data
// the tensor-parallel CLI tests calibrate on.
inline void write_tiny_token_data(const std::string& path) {
  std::ofstream out(path);
  out << "{\"input_ids\": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]}\n"
      << "{\"input_ids\": [100, 200, 300, 400, 500, 600]}\n"
      << "{\"input_ids\": [2047, 0, 17, 33, 99, 1024, 5, 6, 7]}\n";
}

// A whole file as bytes ("" when it cannot be read).
inline std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream all;
  all << in.rdbuf();
  return all.str();
}

}  // namespace fp8kv::testing
