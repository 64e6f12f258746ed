// fp8kv generate: greedy generation from token ids with a chosen KV cache.
#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "fp8kv/backend.h"
#include "fp8kv/error.h"
#include "fp8kv/model.h"
#include "fp8kv/scheme.h"

namespace fp8kv::cli {

namespace {

// "1,2,3" -> {1, 2, 3}.
std::vector<int32_t> parse_ids(const std::string& text) {
  std::vector<int32_t> ids;
  size_t i = 0;
  while (i <= text.size()) {
    const size_t j = std::min(text.find(',', i), text.size());
    const std::string item = text.substr(i, j - i);
    size_t used = 0;
    long v = -1;
    try {
      v = std::stol(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (item.empty() || used != item.size() || v < 0 || v > 2147483647L) {
      throw fp8kv::Error("--input-ids '" + text + "': '" + item + "' is not a token id");
    }
    ids.push_back(static_cast<int32_t>(v));
    i = j + 1;
  }
  return ids;
}

}  // namespace

void add_generate(CLI::App& app) {
  struct Opts {
    std::string model, kv = "bf16";
    std::optional<std::string> calib;
    std::vector<std::string> inputs;
    int max_new = 16;
  };
  auto opt = std::make_shared<Opts>();
  CLI::App* cmd = app.add_subcommand("generate", "Greedy generation from token ids");
  cmd->add_option("--model", opt->model, "Model folder (config.json + *.safetensors)")->required();
  cmd->add_option("--kv", opt->kv, "KV cache: bf16, fp8-per-head or fp8-per-tensor")
      ->capture_default_str();
  cmd->add_option("--calib", opt->calib, "Calibration file (required for the FP8 caches)");
  cmd->add_option("--input-ids", opt->inputs,
                  "Prompt token ids, comma separated; repeat for a batch of prompts")
      ->required();
  cmd->add_option("--max-new", opt->max_new, "Tokens to generate per prompt")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->callback([opt]() {
    const KvScheme scheme = parse_scheme(opt->kv);
    std::vector<std::vector<int32_t>> prompts;
    for (const auto& s : opt->inputs) prompts.push_back(parse_ids(s));
    auto backend = make_cpu_backend();
    auto ops = make_cpu_model_ops();
    // Refuse a missing calibration file before the (possibly long) model load.
    if (is_fp8(scheme) && !opt->calib) {
      throw fp8kv::Error(std::string("--kv ") + scheme_name(scheme) +
                         " needs --calib FILE (a kv_cache_calib.json made by `fp8kv calibrate`); "
                         "refusing to run with scales of 1.0");
    }
    if (!is_fp8(scheme) && opt->calib) throw fp8kv::Error("--calib is only for the FP8 caches");
    auto model = Model::load(opt->model, *backend, true);
    RunnerOptions ro;
    ro.scheme = scheme;
    if (is_fp8(scheme)) ro.scales = load_scales_for_model(*opt->calib, model->config(), scheme);
    int longest = 0;
    for (const auto& p : prompts) longest = std::max(longest, static_cast<int>(p.size()));
    ro.max_len = longest + opt->max_new;
    ro.max_requests = static_cast<int>(prompts.size());
    ro.num_slots = static_cast<int64_t>(ro.max_len) * ro.max_requests;
    ModelRunner runner(*model, *backend, *ops, std::move(ro));
    const auto t0 = std::chrono::steady_clock::now();
    const auto out = runner.generate(prompts, opt->max_new);
    const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    for (const auto& seq : out) {
      std::string line;
      for (size_t i = 0; i < seq.size(); ++i) line += (i ? "," : "") + std::to_string(seq[i]);
      std::printf("%s\n", line.c_str());
    }
    std::fprintf(stderr, "generated %zu x %d tokens with a %s cache in %.2f s\n", out.size(),
                 opt->max_new, scheme_name(scheme), sec);
  });
}

}  // namespace fp8kv::cli
