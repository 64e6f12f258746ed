#include "fp8kv/progress.h"

#include <unistd.h>

#include <cstdio>

namespace fp8kv {

namespace {

std::string format_seconds(double s) {
  char buf[32];
  if (s < 0 || s > 1e7) return "?";
  const int t = static_cast<int>(s + 0.5);
  if (t >= 3600) {
    std::snprintf(buf, sizeof buf, "%dh%02dm", t / 3600, (t / 60) % 60);
  } else if (t >= 60) {
    std::snprintf(buf, sizeof buf, "%dm%02ds", t / 60, t % 60);
  } else {
    std::snprintf(buf, sizeof buf, "%ds", t);
  }
  return buf;
}

}  // namespace

Progress::Progress(std::string label, int64_t total, bool enabled)
    : label_(std::move(label)),
      total_(total),
      enabled_(enabled),
      tty_(isatty(fileno(stderr)) != 0),
      start_(std::chrono::steady_clock::now()),
      last_print_(start_) {}

Progress::~Progress() { finish(); }

void Progress::update(int64_t done, int64_t tokens) {
  done_ = done;
  tokens_ = tokens;
  if (!enabled_ || finished_) return;
  const auto now = std::chrono::steady_clock::now();
  const double since = std::chrono::duration<double>(now - last_print_).count();
  // A terminal line is cheap to rewrite; a log gets a line every few seconds.
  if (since >= (tty_ ? 0.2 : 5.0)) {
    last_print_ = now;
    print(false);
  }
}

void Progress::finish() {
  if (!enabled_ || finished_) return;
  finished_ = true;
  print(true);
}

void Progress::print(bool final_line) {
  const double elapsed =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  char rate[64] = "";
  if (tokens_ > 0 && elapsed > 0) {
    std::snprintf(rate, sizeof rate, "  %.0f tok/s", tokens_ / elapsed);
  }
  std::string eta;
  if (final_line) {
    eta = "  done in " + format_seconds(elapsed);
  } else if (done_ > 0 && total_ > 0) {
    eta = "  ETA " + format_seconds(elapsed / done_ * (total_ - done_));
  }
  std::fprintf(stderr, "%s%s  %lld/%lld%s%s%s", tty_ ? "\r\033[K" : "", label_.c_str(),
               static_cast<long long>(done_), static_cast<long long>(total_), rate, eta.c_str(),
               (final_line || !tty_) ? "\n" : "");
  std::fflush(stderr);
}

}  // namespace fp8kv
