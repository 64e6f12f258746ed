// Progress of long work on stderr: on a terminal one line rewritten in place
// ("label  done/total  tokens/s  ETA"), otherwise a plain line every few seconds and at the end.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

#include "fp8kv/export.h"

namespace fp8kv {

class FP8KV_API Progress {
 public:
  // `total` units of work (sequences, tensors, ...), `enabled` false prints nothing.
  Progress(std::string label, int64_t total, bool enabled = true);
  ~Progress();
  // `done` units finished so far, `tokens` tokens processed so far (0: no rate shown).
  void update(int64_t done, int64_t tokens = 0);
  // Prints the final line (once; also done by the destructor).
  void finish();

 private:
  void print(bool final_line);
  std::string label_;
  int64_t total_;
  bool enabled_;
  bool tty_;
  bool finished_ = false;
  int64_t done_ = 0;
  int64_t tokens_ = 0;
  std::chrono::steady_clock::time_point start_;
  std::chrono::steady_clock::time_point last_print_;
};

}  // namespace fp8kv
