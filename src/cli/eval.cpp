// fp8kv eval: bf16 vs the FP8 caches (fp8-per-tensor and fp8-per-head by default; --kv-schemes
// adds fp8-e5m2 and fp8-per-head-bf16q) on the same token data, one table.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "cli/parallel.h"
#include "cli/text_input.h"
#include "fp8kv/backend.h"
#include "fp8kv/calib.h"
#include "fp8kv/error.h"
#include "fp8kv/model.h"
#include "fp8kv/token_data.h"
#include "fp8kv/workflows.h"

namespace fp8kv::cli {

namespace {

// The scales of `scheme` for the model's rank: from `file` when given (a per_tensor file for
// fp8-per-head broadcast to every KV head), else calibrated on `data` (and said so, by rank 0).
RankScales scales_or_calibrate(const Model& model, Backend& backend, ModelOps& ops,
                               const TokenData& data, KvScheme scheme,
                               const std::optional<std::string>& file, int batch,
                               Communicator& comm) {
  const bool rank0 = comm.rank() == 0;
  if (file) {
    RankScales s = load_scales_for_model(*file, model.config(), scheme, model.shard());
    if (rank0) {
      std::printf("%s: scales from %s%s\n", scheme_name(scheme), file->c_str(),
                  s.broadcast_from_per_tensor
                      ? " (per_tensor: each layer's K and V scale broadcast to every KV head)"
                      : "");
    }
    return s;
  }
  if (rank0) {
    std::printf("%s: no calibration file given; calibrating on the evaluation data itself\n",
                scheme_name(scheme));
    std::fflush(stdout);
  }
  CalibrateOptions co;
  co.quant_type = *calib_quant_type(scheme);
  co.batch_size = batch;
  co.show_progress = rank0;
  co.comm = &comm;
  const CalibrateResult r = calibrate(model, backend, ops, data, co);
  return slice_for_rank(r.data, model.shard().tp, model.shard().rank);
}

// "--kv-schemes fp8-per-tensor,fp8-e5m2" -> the FP8 schemes, in order; "all" is every FP8 scheme.
std::vector<KvScheme> parse_eval_schemes(const std::string& text) {
  std::vector<KvScheme> out;
  if (text == "all") {
    for (KvScheme s : kAllSchemes) {
      if (is_fp8(s)) out.push_back(s);
    }
    return out;
  }
  size_t start = 0;
  while (true) {
    const size_t comma = text.find(',', start);
    const std::string item =
        text.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    KvScheme s;
    try {
      s = parse_scheme(item);
    } catch (const Error& e) {
      throw Error(std::string("--kv-schemes: ") + e.what());
    }
    if (!is_fp8(s)) {
      throw Error("--kv-schemes: '" + item +
                  "' is not an FP8 cache (bf16 is always the reference)");
    }
    if (std::find(out.begin(), out.end(), s) != out.end()) {
      throw Error("--kv-schemes: '" + item + "' is given twice in '" + text + "'");
    }
    out.push_back(s);
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return out;
}

bool uses(const std::vector<KvScheme>& schemes, QuantType q) {
  return std::any_of(schemes.begin(), schemes.end(),
                     [q](KvScheme s) { return calib_quant_type(s) == q; });
}

}  // namespace

void add_eval(CLI::App& app) {
  struct Opts {
    std::string model, data, device = "auto";
    std::optional<std::string> per_head, per_tensor;
    std::optional<std::string> bf16_layers;
    int batch = 4;
    int tp = 1;
    bool per_head_table = false;
    std::string kv_schemes = "fp8-per-tensor,fp8-per-head";
    TextInput text;
  };
  auto opt = std::make_shared<Opts>();
  CLI::App* cmd = app.add_subcommand(
      "eval", "Compare the bf16 KV cache with FP8 ones (default fp8-per-tensor, fp8-per-head)");
  cmd->add_option("--model", opt->model, "Model folder (config.json + *.safetensors)")->required();
  add_data_options(cmd, opt->data, opt->text);
  cmd->add_option("--per-head-calib", opt->per_head,
                  "Per-head scales, any format convert reads; a per-tensor file is broadcast to "
                  "every KV head (default: calibrate on --data)");
  cmd->add_option("--per-tensor-calib", opt->per_tensor,
                  "Per-tensor scales, any format convert reads (default: calibrate on --data)");
  cmd->add_option("--kv-bf16-layers", opt->bf16_layers,
                  "Keep these layers' K/V in bf16 in every FP8 cache, e.g. 0,31");
  cmd->add_option("--kv-schemes", opt->kv_schemes,
                  "FP8 caches to compare with bf16, comma separated, from fp8-per-tensor, "
                  "fp8-per-head, fp8-e5m2, fp8-per-head-bf16q; 'all' for every one (each adds "
                  "one full run)")
      ->capture_default_str();
  cmd->add_option("--batch", opt->batch, "Sequences per forward pass")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_flag("--per-head", opt->per_head_table,
                "Also print the attention error of every (layer, KV head)");
  add_device_and_tp_options(cmd, opt->device, opt->tp);
  cmd->callback([opt]() {
    check_data_choice(opt->data, opt->text, opt->model);
    // Checked before the (possibly long) model load; the layers' range by the pool.
    std::vector<int> bf16_layers;
    if (opt->bf16_layers) bf16_layers = parse_layer_list(*opt->bf16_layers, "--kv-bf16-layers");
    const std::vector<KvScheme> schemes = parse_eval_schemes(opt->kv_schemes);
    const bool want_pt = uses(schemes, QuantType::kPerTensor);
    const bool want_ph = uses(schemes, QuantType::kPerHead);
    if (opt->per_tensor && !want_pt) {
      throw Error("--per-tensor-calib: no scheme in --kv-schemes '" + opt->kv_schemes +
                  "' takes per-tensor scales (fp8-per-tensor does)");
    }
    if (opt->per_head && !want_ph) {
      throw Error("--per-head-calib: no scheme in --kv-schemes '" + opt->kv_schemes +
                  "' takes per-head scales (fp8-per-head and fp8-per-head-bf16q do)");
    }
    run_tensor_parallel(opt->tp, opt->device, [&](Communicator& comm) {
      const bool rank0 = comm.rank() == 0;
      Device dev = make_device(opt->device);
      Backend* backend = dev.backend.get();
      ModelOps* ops = dev.ops.get();
      auto model = Model::load(opt->model, *backend, rank0, dev.weights, opt->tp, comm.rank());
      const TokenData data =
          load_data(opt->data, opt->text, opt->model, model->config().vocab_size, rank0);
      // Only the scales a chosen scheme reads are loaded (or calibrated).
      const RankScales pt =
          want_pt ? scales_or_calibrate(*model, *backend, *ops, data, KvScheme::kFp8PerTensor,
                                        opt->per_tensor, opt->batch, comm)
                  : RankScales{};
      const RankScales ph =
          want_ph ? scales_or_calibrate(*model, *backend, *ops, data, KvScheme::kFp8PerHead,
                                        opt->per_head, opt->batch, comm)
                  : RankScales{};
      EvalOptions eo;
      eo.batch_size = opt->batch;
      eo.show_progress = rank0;
      eo.comm = &comm;
      eo.bf16_layers = bf16_layers;
      eo.schemes = schemes;
      const EvalResult r = evaluate(*model, *backend, *ops, data, pt, ph, eo);
      if (rank0) {
        std::printf("\n%s", format_eval_table(r).c_str());
        if (opt->per_head_table) std::printf("\n%s", format_eval_heads(r).c_str());
      }
    });
  });
}

}  // namespace fp8kv::cli
