// fp8kv convert: rewrite a kv_cache_calib.json in another layout. Today the two tensor-parallel
// layouts of LightLLM's file (docs/FORMATS.md): the merged one (num_head = the model's KV heads,
// what calibrate writes by default) and LightLLM's per-rank one (num_head = KV heads per rank x
// ranks, each replicated head once per rank). More target formats can join `--to`.
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <memory>
#include <optional>
#include <string>

#include "cli/commands.h"
#include "fp8kv/calib.h"
#include "fp8kv/error.h"
#include "fp8kv/model_config.h"

namespace fp8kv::cli {
namespace {

struct ConvertOptions {
  std::string in, out, to;
  std::optional<int> tp;
  std::optional<int> num_kv_heads;
  std::optional<std::string> model;
};

// The model's KV heads: --num-kv-heads, else the model's config.json, else the input's num_head
// (the input is then taken to be merged already).
std::optional<int> kv_heads_of(const ConvertOptions& opt) {
  if (opt.num_kv_heads) return opt.num_kv_heads;
  if (opt.model) return load_model_config(*opt.model).num_kv_heads;
  return std::nullopt;
}

void run_convert(const ConvertOptions& opt) {
  if (opt.in == opt.out) {
    throw Error(fmt::format("convert: IN and OUT are the same file ({}); write elsewhere", opt.in));
  }
  CalibExpect expect;
  expect.num_kv_heads = kv_heads_of(opt);
  if (opt.model && !opt.num_kv_heads) {
    const ModelConfig config = load_model_config(*opt.model);
    expect.architectures = config.architecture;
    expect.num_layers = config.num_layers;
  }
  const CalibData merged = load_calib(opt.in, expect);  // merges a per-rank input
  const int H = merged.num_head;
  CalibData result;
  if (opt.to == "lightllm") {
    result = merged;
  } else if (opt.to == "lightllm-rank-layout") {
    if (!opt.tp) {
      throw Error(
          "convert --to lightllm-rank-layout: --tp N is required (the ranks the file "
          "is for)");
    }
    result = to_rank_layout(merged, *opt.tp);
  } else {
    throw Error(
        fmt::format("convert: --to: expected lightllm or lightllm-rank-layout, found {}", opt.to));
  }
  write_calib(opt.out, result);

  fmt::print("read {}: {} layers, {}, num_head {}", opt.in, merged.num_layers,
             quant_type_name(merged.quant_type),
             merged.rank_layout ? merged.rank_layout->file_num_head : H);
  if (merged.rank_layout) {
    fmt::print(
        " (LightLLM's per-rank layout: {} KV heads, each written by {} ranks; largest "
        "disagreement between copies {})",
        H, merged.rank_layout->copies, merged.rank_layout->max_disagreement);
  }
  fmt::print("\n");
  if (opt.to == "lightllm") {
    fmt::print("wrote {}: merged layout, num_head {} (one column per KV head)\n", opt.out, H);
  } else {
    const int copies = result.num_head / H;
    fmt::print("wrote {}: LightLLM's per-rank layout for {} ranks, num_head {}{}\n", opt.out,
               *opt.tp, result.num_head,
               copies > 1 ? fmt::format(", each KV head written by {} ranks", copies)
                          : std::string(" (the same as the merged layout: no head is replicated)"));
  }
}

}  // namespace

void add_convert(CLI::App& app) {
  auto opt = std::make_shared<ConvertOptions>();
  CLI::App* cmd = app.add_subcommand(
      "convert", "Rewrite a kv_cache_calib.json in another layout (LightLLM's merged or per-rank)");
  cmd->add_option("in", opt->in, "Calibration file to read")->required();
  cmd->add_option("out", opt->out, "Calibration file to write (atomically)")->required();
  cmd->add_option("--to", opt->to,
                  "lightllm: one column per KV head (calibrate's default); lightllm-rank-layout: "
                  "LightLLM's per-rank layout for --tp ranks")
      ->required();
  cmd->add_option("--tp", opt->tp, "Tensor-parallel ranks the per-rank layout is for")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--num-kv-heads", opt->num_kv_heads,
                  "The model's KV heads, to read a per-rank input (default: --model's, else the "
                  "input's num_head)")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--model", opt->model, "Model folder whose config.json gives the KV heads");
  cmd->callback([opt]() { run_convert(*opt); });
}

}  // namespace fp8kv::cli
