// fp8kv calibrate: run a model over token data with a bf16 cache, observe K/V abs-max, write
// kv_cache_calib.json.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>

#include "cli/commands.h"
#include "cli/parallel.h"
#include "cli/text_input.h"
#include "fp8kv/backend.h"
#include "fp8kv/calib.h"
#include "fp8kv/error.h"
#include "fp8kv/model.h"
#include "fp8kv/scheme.h"
#include "fp8kv/token_data.h"
#include "fp8kv/workflows.h"

namespace fp8kv::cli {

void add_calibrate(CLI::App& app) {
  struct Opts {
    std::string model, data, scheme = "per-head", out = "kv_cache_calib.json", device = "auto";
    std::optional<int> warmup, count;
    int batch = 4;
    int tp = 1;
    TextInput text;
    bool fast_gemm = false;
  };
  auto opt = std::make_shared<Opts>();
  CLI::App* cmd = app.add_subcommand(
      "calibrate", "Observe K/V abs-max over token data and write kv_cache_calib.json");
  cmd->add_option("--model", opt->model, "Model folder (config.json + *.safetensors)")->required();
  add_data_options(cmd, opt->data, opt->text);
  cmd->add_option("--scheme", opt->scheme, "per-head or per-tensor")->capture_default_str();
  cmd->add_option("--out", opt->out, "Calibration file to write")->capture_default_str();
  cmd->add_option("--warmup", opt->warmup,
                  "Forward passes each layer skips first (default 0, or FP8KV_CALIB_WARMUP)");
  cmd->add_option("--count", opt->count,
                  "Forward passes each layer observes (default: all the data gives, or "
                  "FP8KV_CALIB_COUNT)");
  cmd->add_option("--batch", opt->batch, "Sequences per forward pass")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  add_device_and_tp_options(cmd, opt->device, opt->tp);
  cmd->add_flag("--fast-gemm", opt->fast_gemm,
                "Use the fast GEMMs (cuBLAS on the GPU) instead of the fixed-order ones; with "
                "them a --tp N file can differ from the --tp 1 file in the last bits after "
                "layer 0");
  cmd->callback([opt]() {
    check_data_choice(opt->data, opt->text, opt->model);
    const KvScheme scheme = parse_scheme(opt->scheme);
    if (!is_fp8(scheme)) throw fp8kv::Error("calibrate: --scheme must be per-head or per-tensor");
    run_tensor_parallel(opt->tp, opt->device, [&](Communicator& comm) {
      const bool rank0 = comm.rank() == 0;
      Device dev = make_device(opt->device);
      Backend* backend = dev.backend.get();
      ModelOps* ops = dev.ops.get();
      auto model = Model::load(opt->model, *backend, rank0, dev.weights, opt->tp, comm.rank());
      const TokenData data =
          load_data(opt->data, opt->text, opt->model, model->config().vocab_size, rank0);
      CalibrateOptions co;
      co.quant_type =
          scheme == KvScheme::kFp8PerHead ? QuantType::kPerHead : QuantType::kPerTensor;
      co.warmup = opt->warmup;
      co.count = opt->count;
      co.batch_size = opt->batch;
      co.show_progress = rank0;
      co.comm = &comm;
      co.exact_tp = !opt->fast_gemm;
      const CalibrateResult r = calibrate(*model, *backend, *ops, data, co);
      if (!rank0) return;
      write_calib(opt->out, r.data);
      const auto mm = std::minmax_element(r.data.scales.begin(), r.data.scales.end());
      std::printf("calibrated %s (%s): %d layers x %d KV heads, %s scales in [%.4g, %.4g]\n",
                  opt->model.c_str(), r.data.architectures.c_str(), r.data.num_layers,
                  r.data.num_head, quant_type_name(r.data.quant_type), *mm.first, *mm.second);
      std::printf("observed %d forward passes per layer after %d warmup (%d run, %lld tokens)\n",
                  r.count, r.warmup, r.passes_run, static_cast<long long>(r.tokens));
      if (opt->tp > 1) std::printf("tensor parallel: %d ranks\n", opt->tp);
      std::printf("wrote %s\n", opt->out.c_str());
    });
  });
}

}  // namespace fp8kv::cli
