// fp8kv inspect: load KV scales in any format load_kv_scales reads, validate them against what
// the user says about the model, and print a summary that fits a 100-column terminal.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "fp8kv/calib.h"
#include "fp8kv/error.h"
#include "fp8kv/scale_tensors.h"
#include "fp8kv/scheme.h"

namespace fp8kv::cli {
namespace {

// Table geometry for a 100-column terminal.
constexpr int kLabelWidth = 6;  // "layer" column
constexpr int kCellWidth = 11;  // " 1.234e-02 " with room for a label like "K h127"
constexpr int kTerminalWidth = 100;
constexpr int kEllipsisWidth = 5;
constexpr int kMaxColumns = (kTerminalWidth - kLabelWidth) / kCellWidth;  // 8
constexpr int kEdgeColumns = 3;  // columns shown on each side when some are elided
constexpr int kEdgeRows = 8;     // rows shown at each end when some are elided

struct InspectOptions {
  std::string file;
  std::optional<std::string> arch;
  std::optional<int> num_layers;
  std::optional<int> num_kv_heads;
  std::optional<int> tp;
  std::optional<int> rank;
  std::optional<std::string> scheme;
  bool all = false;                   // print every row and column
  std::optional<std::string> reduce;  // "max": quant-param JSON ranks that disagree, merged
};

std::string sci(float x) { return fmt::format("{:.3e}", x); }

struct Stats {
  float min = 0, median = 0, max = 0;
};

// values: any non-empty set of scales.
Stats stats_of(std::vector<float> values) {
  std::sort(values.begin(), values.end());
  const size_t n = values.size(), mid = n / 2;
  const float median = n % 2 ? values[mid] : 0.5f * (values[mid - 1] + values[mid]);
  return {values.front(), median, values.back()};
}

void print_stats(const char* label, const std::vector<float>& values) {
  if (values.empty()) return;
  const Stats s = stats_of(values);
  fmt::print("{:<14}min {}   median {}   max {}\n", label, sci(s.min), sci(s.median), sci(s.max));
}

// The indices to show out of `count`, with -1 standing for an elided run ("...").
std::vector<int> shown_indices(int count, int edge, int max_shown, bool all) {
  std::vector<int> out;
  if (all || count <= max_shown) {
    for (int i = 0; i < count; ++i) out.push_back(i);
    return out;
  }
  for (int i = 0; i < edge; ++i) out.push_back(i);
  out.push_back(-1);
  for (int i = count - edge; i < count; ++i) out.push_back(i);
  return out;
}

// Prints a [rows, columns] matrix (value(row, column)) with a layer label on each row, eliding
// middle rows and columns so that it fits the terminal unless `all`.
void print_table(const std::string& title, int rows, int columns,
                 const std::function<std::string(int)>& column_label,
                 const std::function<float(int, int)>& value, bool all) {
  const std::vector<int> row_ids = shown_indices(rows, kEdgeRows, 2 * kEdgeRows, all);
  const std::vector<int> col_ids = shown_indices(columns, kEdgeColumns, kMaxColumns, all);
  std::string note;
  if (row_ids.size() != static_cast<size_t>(rows)) {
    note += fmt::format("layers {}..{}", kEdgeRows, rows - kEdgeRows - 1);
  }
  if (col_ids.size() != static_cast<size_t>(columns)) {
    note += fmt::format("{}heads {}..{}", note.empty() ? "" : " and ", kEdgeColumns,
                        columns - kEdgeColumns - 1);
  }
  fmt::print("\n{}{}\n", title, note.empty() ? "" : " (" + note + " elided; --all shows all)");

  std::string header = fmt::format("{:>{}}", "layer", kLabelWidth - 1);
  for (int c : col_ids) {
    header += c < 0 ? fmt::format("{:>{}}", "...", kEllipsisWidth)
                    : fmt::format("{:>{}}", column_label(c), kCellWidth);
  }
  fmt::print("{}\n", header);
  for (int r : row_ids) {
    if (r < 0) {
      fmt::print("{:>{}}\n", "...", kLabelWidth - 1);
      continue;
    }
    std::string line = fmt::format("{:>{}}", r, kLabelWidth - 1);
    for (int c : col_ids) {
      line += c < 0 ? fmt::format("{:>{}}", "...", kEllipsisWidth)
                    : fmt::format("{:>{}}", sci(value(r, c)), kCellWidth);
    }
    fmt::print("{}\n", line);
  }
}

// The K and V halves of a per-head matrix [rows, 2 * heads] as two tables (or one [k, v] table
// for per_tensor). head_label(j) names column j of a half, e.g. its global head.
void print_kv_tables(const std::string& what, QuantType type, int rows, int heads,
                     const std::vector<float>& kv,
                     const std::function<std::string(int)>& head_label, bool all) {
  if (type == QuantType::kPerTensor) {
    print_table(
        what + " scales per layer", rows, 2, [](int c) { return std::string(c == 0 ? "K" : "V"); },
        [&](int r, int c) { return kv[static_cast<size_t>(r) * 2 + c]; }, all);
    return;
  }
  const size_t width = static_cast<size_t>(2) * heads;
  print_table(
      what + " K scales, layer x KV head", rows, heads, head_label,
      [&](int r, int c) { return kv[r * width + c]; }, all);
  print_table(
      what + " V scales, layer x KV head", rows, heads, head_label,
      [&](int r, int c) { return kv[r * width + heads + c]; }, all);
}

// All K (half = 0) or V (half = 1) scales of a [rows, 2 * heads] or [rows, 2] matrix.
std::vector<float> half_of(const std::vector<float>& kv, int rows, int half_width, int half) {
  std::vector<float> out;
  out.reserve(static_cast<size_t>(rows) * half_width);
  for (int r = 0; r < rows; ++r) {
    const float* row = kv.data() + static_cast<size_t>(r) * 2 * half_width;
    out.insert(out.end(), row + half * half_width, row + (half + 1) * half_width);
  }
  return out;
}

void run_inspect(const InspectOptions& opt) {
  CalibExpect expect;
  expect.architectures = opt.arch;
  expect.num_layers = opt.num_layers;
  expect.num_kv_heads = opt.num_kv_heads;
  if (opt.scheme) {
    const KvScheme scheme = parse_scheme(*opt.scheme);
    expect.quant_type = calib_quant_type(scheme);
    if (!expect.quant_type) {
      throw Error(
          fmt::format("--scheme: expected fp8-per-head, fp8-per-tensor or fp8-per-head-bf16q "
                      "(a {} cache has no calibration file), found {}",
                      scheme_name(scheme), *opt.scheme));
    }
  }
  const LoadedScales loaded = load_kv_scales(opt.file, expect, opt.reduce.has_value());
  const CalibData& d = loaded.data;
  // Slice before printing anything, so a bad --tp/--rank refuses without a half-printed summary.
  std::optional<RankScales> slice;
  if (opt.tp) slice = slice_for_rank(d, *opt.tp, *opt.rank);

  const bool per_head = d.quant_type == QuantType::kPerHead;
  const KvScheme scheme = per_head ? KvScheme::kFp8PerHead : KvScheme::kFp8PerTensor;
  const bool lightllm = loaded.format == "lightllm";
  const std::string absent = "(not in this format)";
  fmt::print("{:<14}{}\n", "file", opt.file);
  fmt::print("{:<14}{}{}\n", "format", loaded.format,
             loaded.detail.empty() ? "" : " (" + loaded.detail + ")");
  if (lightllm) fmt::print("{:<14}{}\n", "version", d.version);
  fmt::print("{:<14}{}\n", "model", d.architectures.empty() ? absent : d.architectures);
  fmt::print(
      "{:<14}{} (scheme {}): {}\n", "quant_type", quant_type_name(d.quant_type),
      scheme_name(scheme),
      per_head ? "one K and one V scale per layer and KV head" : "one K and one V scale per layer");
  if (lightllm) fmt::print("{:<14}qmin {:.1f}, qmax {:.1f} (E4M3)\n", "range", d.qmin, d.qmax);
  if (d.num_target_layers) {
    fmt::print("{:<14}{} ({} target + {} draft; draft rows are {}..{})\n", "layers", d.num_layers,
               *d.num_target_layers, *d.num_draft_layers, *d.num_target_layers, d.num_layers - 1);
  } else {
    fmt::print("{:<14}{}\n", "layers", d.num_layers);
  }
  if (d.num_head > 0) {
    fmt::print("{:<14}{} (over all tensor-parallel ranks)\n", "KV heads", d.num_head);
  } else {
    fmt::print("{:<14}{} (--num-kv-heads says)\n", "KV heads", absent);
  }
  if (d.rank_layout) {
    const RankLayoutOrigin& o = *d.rank_layout;
    fmt::print(
        "{:<14}LightLLM's per-rank layout, written by {} ranks per head: num_head {} = {} x {}\n",
        "layout", o.copies, o.file_num_head, d.num_head, o.copies);
    fmt::print("{:<14}(the copies of each head merged by max)\n", "");
    if (d.quant_type == QuantType::kPerTensor) {
      fmt::print("{:<14}none to compare (per_tensor: one [k, v] per layer)\n", "copies");
    } else if (o.worst_layer < 0) {
      fmt::print("{:<14}largest disagreement 0 (every copy identical)\n", "copies");
    } else {
      fmt::print("{:<14}largest disagreement {} (layer {}, {}: one float32 step)\n", "copies",
                 sci(o.max_disagreement), o.worst_layer,
                 o.worst_column < d.num_head
                     ? fmt::format("K head {}", o.worst_column)
                     : fmt::format("V head {}", o.worst_column - d.num_head));
    }
  } else if (!opt.num_kv_heads && lightllm) {
    const int k = apparent_rank_copies(d);
    if (k > 1) {
      fmt::print(
          "{:<14}columns come in runs of {} equal scales: LightLLM's per-rank layout of {} KV\n",
          "layout?", k, d.num_head / k);
      fmt::print("{:<14}heads written by {} ranks per head? (--num-kv-heads {} merges it)\n", "", k,
                 d.num_head / k);
    }
  }
  if (lightllm) fmt::print("{:<14}[{}, {}]\n", "scales_shape", d.num_layers, d.row_width());
  if (d.q_scales) {
    fmt::print("{:<14}num_head {}, scales_shape [{}, {}]\n", "q_calibration", d.q_scales->num_head,
               d.num_layers, d.q_scales->num_head);
  } else {
    fmt::print("{:<14}none\n", "q_calibration");
  }
  std::vector<std::string> checked;
  if (opt.arch) checked.push_back("architectures");
  if (opt.num_layers) checked.push_back("num_layers");
  if (opt.num_kv_heads) checked.push_back("num_head");
  if (opt.scheme) checked.push_back("quant_type");
  fmt::print("{:<14}{}\n", "checked",
             checked.empty() ? std::string("file rules only (no model given)")
                             : fmt::format("file rules and {}: OK", fmt::join(checked, ", ")));
  if (expect.quant_type && *expect.quant_type != d.quant_type) {
    fmt::print("{:<14}{} reads it broadcast: each layer's K and V scale for every KV head\n", "",
               scheme_name(parse_scheme(*opt.scheme)));
  }

  const int half_width = per_head ? d.num_head : 1;
  print_stats("K scales", half_of(d.scales, d.num_layers, half_width, 0));
  print_stats("V scales", half_of(d.scales, d.num_layers, half_width, 1));
  if (d.q_scales) print_stats("Q scales", d.q_scales->scales);

  auto global_head = [](int j) { return fmt::format("h{}", j); };
  print_kv_tables("all ranks:", d.quant_type, d.num_layers, d.num_head, d.scales, global_head,
                  opt.all);
  if (d.q_scales) {
    const QScales& q = *d.q_scales;
    print_table(
        "all ranks: Q scales, layer x Q-scale head", d.num_layers, q.num_head, global_head,
        [&](int r, int c) { return q.scales[r * q.num_head + c]; }, opt.all);
  }

  if (!slice) return;
  const int tp = *opt.tp, rank = *opt.rank, h = slice->heads_per_rank;
  const int replication = tp * h / d.num_head;
  fmt::print("\ntensor parallel: rank {} of {}\n", rank, tp);
  // Rank-local head j is replicated head rank*h + j, i.e. global head (rank*h + j) / f.
  auto rank_head = [&](int j) { return fmt::format("h{}", (rank * h + j) / replication); };
  std::string heads = fmt::format("{} (global head{} ", h, h > 1 ? "s" : "");
  heads += h > 1
               ? fmt::format("{}..{})", rank * h / replication, ((rank + 1) * h - 1) / replication)
               : fmt::format("{})", rank * h / replication);
  if (replication > 1) heads += fmt::format(", each head replicated on {} ranks", replication);
  fmt::print("{:<14}{}\n", "KV heads", heads);
  if (!per_head) {
    fmt::print("{:<14}per_tensor: every rank uses each layer's [k, v] as listed above\n", "scales");
  } else {
    fmt::print("{:<14}[{}, {}] (K of the rank's heads, then V)\n", "scales", slice->num_layers,
               slice->row_width());
    print_kv_tables(fmt::format("rank {}:", rank), slice->quant_type, slice->num_layers, h,
                    slice->kv, rank_head, opt.all);
  }
  if (slice->q) {
    const std::vector<float>& q = *slice->q;
    print_table(
        fmt::format("rank {}: Q scales, layer x KV head", rank), slice->num_layers, h, rank_head,
        [&](int r, int c) { return q[static_cast<size_t>(r) * h + c]; }, opt.all);
  }
}

}  // namespace

void add_inspect(CLI::App& app) {
  auto opt = std::make_shared<InspectOptions>();
  CLI::App* cmd = app.add_subcommand(
      "inspect",
      "Validate KV scales in any format convert reads and print them (optionally one "
      "rank's)");
  cmd->add_option("file", opt->file,
                  "kv_cache_calib.json, quant-param JSON, .safetensors of scale tensors, or a "
                  "model folder carrying them")
      ->required();
  cmd->add_option("--arch", opt->arch, "Expected architectures, e.g. Qwen2ForCausalLM");
  cmd->add_option("--num-layers", opt->num_layers, "Expected layers of the model")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--num-kv-heads", opt->num_kv_heads, "Expected KV heads over all ranks")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--scheme", opt->scheme,
                  "Expected scheme: per-head|per-tensor (or fp8-per-head|fp8-per-tensor)");
  CLI::Option* tp = cmd->add_option("--tp", opt->tp, "Tensor-parallel size, to show a rank's slice")
                        ->check(CLI::PositiveNumber);
  CLI::Option* rank = cmd->add_option("--rank", opt->rank, "Rank whose slice to show (0-based)")
                          ->check(CLI::NonNegativeNumber);
  tp->needs(rank);
  rank->needs(tp);
  cmd->add_option("--reduce", opt->reduce,
                  "max: a quant-param JSON whose ranks disagree shows each layer's max over them")
      ->check(CLI::IsMember({"max"}));
  cmd->add_flag("--all", opt->all, "Print every layer and head instead of eliding the middle");
  cmd->callback([opt]() { run_inspect(*opt); });
}

}  // namespace fp8kv::cli
